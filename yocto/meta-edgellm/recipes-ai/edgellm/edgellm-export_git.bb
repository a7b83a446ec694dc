SUMMARY = "edgellm-export: Hugging Face checkpoint to int4 ONNX model package"
DESCRIPTION = "The edgellm exporter alone, mainly as edgellm-export-native: model package \
recipes (edgellm-model-*) run it inside the build, streaming tensor by tensor, with no \
Python or PyTorch."
HOMEPAGE = "https://example.invalid/edgellm"
BUGTRACKER = "https://example.invalid/edgellm/issues"
SECTION = "ai"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=22a53954e4e0ec258dfce4391e905dac"

EDGELLM_GIT_URI ?= "git://example.invalid/edgellm.git;protocol=https;branch=main"
PV = "0.1.0+git"
SRC_URI = "${EDGELLM_GIT_URI}"
SRCREV ?= "${AUTOREV}"

inherit cargo cargo-update-recipe-crates

# The same Cargo.lock, so the same crate list as edgellm.
require edgellm-crates.inc

CARGO_BUILD_FLAGS:append = " --locked -p edgellm-export"

BBCLASSEXTEND = "native"
