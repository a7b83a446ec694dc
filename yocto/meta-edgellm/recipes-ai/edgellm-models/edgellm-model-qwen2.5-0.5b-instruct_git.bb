SUMMARY = "Qwen2.5-0.5B-Instruct as an int4 edgellm model package"
DESCRIPTION = "Exports the Hugging Face checkpoint Qwen/Qwen2.5-0.5B-Instruct to an int4 ONNX \
model package with edgellm-export-native during the build, and installs it read-only under \
/usr/share/edgellm/models, as the default model of edgellmd. A template for other models: \
change the checkpoint, the name and the license."
HOMEPAGE = "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct"
BUGTRACKER = "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/discussions"
SECTION = "ai"
# The model's license (Qwen2.5-0.5B-Instruct: Apache-2.0), not edgellm's.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

DEPENDS += "edgellm-export-native"

# The checkpoint, with its weights (git LFS). Pin SRCREV to the commit you validated. bitbake's
# git fetcher runs the build host's git-lfs (OE-core links it from HOSTTOOLS_NONFATAL; no recipe
# provides a native one): install git-lfs on the build host.
PV = "1.0+git"
SRC_URI = "git://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct;protocol=https;branch=main;lfs=1"
SRCREV ?= "${AUTOREV}"

inherit allarch

# Folder name under /usr/share/edgellm/models, and the KV capacity written into the package
# (prompt plus answer; edgellmd's [model] max_length may lower it, not raise it).
EDGELLM_MODEL_NAME ?= "qwen2.5-0.5b-instruct-int4"
EDGELLM_MODEL_MAX_LENGTH ?= "4096"
# Make this package the `default` symlink edgellmd's configuration points at.
EDGELLM_MODEL_DEFAULT ?= "1"

do_configure[noexec] = "1"

do_compile() {
    edgellm-export --hf ${S} --out ${B}/package --precision int4 \
        --max-length ${EDGELLM_MODEL_MAX_LENGTH} --force
}

do_install() {
    install -d ${D}${datadir}/edgellm/models/${EDGELLM_MODEL_NAME}
    install -m 0644 ${B}/package/* ${D}${datadir}/edgellm/models/${EDGELLM_MODEL_NAME}/
    if [ "${EDGELLM_MODEL_DEFAULT}" = "1" ]; then
        ln -sfn ${EDGELLM_MODEL_NAME} ${D}${datadir}/edgellm/models/default
    fi
}

FILES:${PN} += "${datadir}/edgellm/models"
RRECOMMENDS:${PN} = "edgellm"
