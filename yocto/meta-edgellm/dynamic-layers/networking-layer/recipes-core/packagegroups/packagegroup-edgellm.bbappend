# With meta-networking (mosquitto): the MQTT command-line clients, to talk to edgellmd from a
# shell on the device. Not in the base recipe: OE-core alone has no mosquitto, and an unmet
# RRECOMMENDS leaves the packagegroup, and so the image, unbuildable.
RRECOMMENDS:${PN} += "mosquitto-clients"
