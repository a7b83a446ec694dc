SUMMARY = "edgellm: the daemon, ONNX Runtime when available, D-Bus, and a model"
DESCRIPTION = "What an edgellm device needs: edgellmd and its clients, the system bus, and \
the model package named by EDGELLM_MODEL_PACKAGE (empty for none)."
HOMEPAGE = "https://example.invalid/edgellm"
BUGTRACKER = "https://example.invalid/edgellm/issues"
LICENSE = "MIT"

inherit packagegroup

EDGELLM_MODEL_PACKAGE ?= "edgellm-model-qwen2.5-0.5b-instruct"

RDEPENDS:${PN} = "dbus edgellm"
RDEPENDS:${PN} += "${EDGELLM_MODEL_PACKAGE}"
