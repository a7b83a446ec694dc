SUMMARY = "Example image: a device answering language-model requests over D-Bus and MQTT"
DESCRIPTION = "core-image-minimal with systemd, edgellmd started at boot, a model package, \
and ssh for development (the kas files also set SYSTEMD_AUTO_ENABLE:pn-edgellm = \"enable\", so \
edgellmd starts at boot). Needs DISTRO_FEATURES systemd (INIT_MANAGER = \"systemd\")."
HOMEPAGE = "https://example.invalid/edgellm"
BUGTRACKER = "https://example.invalid/edgellm/issues"
LICENSE = "MIT"

inherit core-image features_check

REQUIRED_DISTRO_FEATURES = "systemd"

IMAGE_FEATURES += "ssh-server-dropbear"
IMAGE_INSTALL:append = " packagegroup-edgellm"
