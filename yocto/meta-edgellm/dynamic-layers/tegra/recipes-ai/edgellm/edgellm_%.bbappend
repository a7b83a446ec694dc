# With meta-tegra in the build (Jetson): the GPU drop-in (systemd/jetson-cuda.conf: device
# nodes, groups video and render, no MemoryDenyWriteExecute) becomes active when
# EDGELLM_JETSON_CUDA = "1". It only helps with a CUDA-enabled ONNX Runtime, which
# meta-onnxruntime does not build (it configures the CPU provider only): keep "0" unless your
# image provides one, then also set execution_providers = ["cuda", "cpu"] (docs/deploy-jetson.md).
EDGELLM_JETSON_CUDA ?= "0"

do_install:append() {
    if [ "${EDGELLM_JETSON_CUDA}" = "1" ]; then
        install -d ${D}${systemd_system_unitdir}/edgellmd.service.d
        install -m 0644 ${S}/systemd/jetson-cuda.conf ${D}${systemd_system_unitdir}/edgellmd.service.d/
    fi
}
