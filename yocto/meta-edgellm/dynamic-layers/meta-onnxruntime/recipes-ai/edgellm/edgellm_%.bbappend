# With meta-onnxruntime in the build: install ONNX Runtime with edgellm and point edgellmd at
# the installed library (a systemd drop-in setting ORT_DYLIB_PATH, so systemd/ and
# /etc/edgellm/edgellm.toml stay as shipped). Without this layer edgellmd runs on tract.
RDEPENDS:${PN} += "onnxruntime"

# The runtime library meta-onnxruntime's onnxruntime package installs (its soname link).
EDGELLM_ONNXRUNTIME_LIBRARY ?= "${libdir}/libonnxruntime.so.1"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}/edgellmd.service.d
    printf '[Service]\nEnvironment=ORT_DYLIB_PATH=%s\n' "${EDGELLM_ONNXRUNTIME_LIBRARY}" \
        > ${D}${systemd_system_unitdir}/edgellmd.service.d/onnxruntime.conf
}
