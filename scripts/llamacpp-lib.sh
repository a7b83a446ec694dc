# shellcheck shell=bash disable=SC2154  # die, say, llroot, ll_py, ll_logs come from the sourcing script
# llama.cpp source and build, shared by scripts/bench-vs-llamacpp.sh and scripts/bench-quality.sh
# (sourced, not run).
#
# llama.cpp comes from the source distribution of `llama-cpp-python` on PyPI (its vendor/llama.cpp),
# fetched with `pip download`; the sdist and the builds are cached under $llroot, so reruns
# skip both steps. Builds are CMake Release, static, CPU only, into $llama/build-MODE, where MODE is
# `native` (-DGGML_NATIVE=ON) or `explicit` (-DGGML_NATIVE=OFF and explicit -DGGML_AVX2/FMA/...
# flags for the instruction sets /proc/cpuinfo lists).
#
# Before sourcing, define die and say (message helpers) and set:
#   llroot   cache folder (e.g. $BENCH_DIR/llama.cpp)
#   ll_py    a python with pip (for `pip download`)
#   ll_logs  folder for the cmake logs
# Environment: LLAMA_CPP_PYTHON_VERSION (the sdist version; default: the one cached under $llroot,
# else the newest on PyPI), LLAMA_NATIVE (1, the default: native build, falling back to explicit
# flags when a binary dies with SIGILL; 0: explicit flags).
#
# Functions:
#   llamacpp_tools_check        cmake (installed with apt-get when missing and possible), c++, pip
#   llamacpp_fetch              sets llama (the llama.cpp source folder) and llversion
#   llamacpp_build MODE TARGET… builds the targets (only the missing ones when the cached build
#                               has the same flags); sets build_dir, build_flags, build_s, ll_mode
#   llamacpp_build_default TARGET…  llamacpp_build with the mode LLAMA_NATIVE selects
#   run_ll TOOL ARGS…           runs $build_dir/bin/TOOL; on SIGILL with a native build, rebuilds
#                               the same targets with explicit flags and runs it again
#   llamacpp_convert_hf CKPT OUT LOG  convert_hf_to_gguf.py CKPT --outtype bf16 --outfile OUT with
#                               $ll_py (torch, transformers, numpy, pyyaml, tqdm), adapted for the
#                               random-init checkpoints (see the function)

llamacpp_tools_check() {
    command -v c++ >/dev/null || die "no C++ compiler (c++) on PATH (Debian: apt-get install -y build-essential)"
    if ! command -v cmake >/dev/null; then
        if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
            say "cmake is missing: apt-get install -y cmake"
            { apt-get install -y cmake || { apt-get update && apt-get install -y cmake; }; } >&2 \
                || die "apt-get install cmake failed"
        else
            die "cmake is missing (Debian: apt-get install -y cmake)"
        fi
    fi
    "$ll_py" -m pip --version >/dev/null 2>&1 || die "$ll_py has no pip (needed for 'pip download llama-cpp-python')"
}

llamacpp_fetch() {
    local src spec sdist
    mkdir -p "$llroot"
    # The sdist folder: the requested version, else a cached one, else the newest on PyPI.
    if [[ -n ${LLAMA_CPP_PYTHON_VERSION:-} ]]; then
        src="$llroot/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
        spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    else
        src="$(find "$llroot" -mindepth 1 -maxdepth 1 -type d -name 'llama_cpp_python-*' 2>/dev/null | sort -V | tail -n 1)"
        spec="llama-cpp-python"
    fi
    if [[ -z $src || ! -f $src/vendor/llama.cpp/CMakeLists.txt ]]; then
        say "downloading the $spec source distribution from PyPI"
        rm -rf "$llroot/dl" && mkdir -p "$llroot/dl"
        # --no-binary only for llama-cpp-python: with :all:, pip would build the build backend's
        # own dependencies (cmake, ninja) from source just to read the sdist's metadata.
        "$ll_py" -m pip download --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
            --dest "$llroot/dl" "$spec" >&2 || die "pip download $spec failed"
        sdist="$(find "$llroot/dl" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n 1)"
        [[ -n $sdist ]] || die "pip download produced no llama_cpp_python-*.tar.gz (got: $(ls "$llroot/dl"))"
        tar -xzf "$sdist" -C "$llroot" || die "cannot unpack $sdist"
        src="$llroot/$(basename "$sdist" .tar.gz)"
        rm -rf "$llroot/dl"
    fi
    llama="$src/vendor/llama.cpp"
    [[ -f $llama/CMakeLists.txt ]] || die "$llama has no CMakeLists.txt (the sdist layout changed?)"
    llversion="${src##*/llama_cpp_python-}"
}

# Explicit instruction-set flags for -DGGML_NATIVE=OFF, from /proc/cpuinfo.
llamacpp_explicit_flags() {
    local flags f
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    local isa_flags=(-DGGML_NATIVE=OFF)
    for f in "avx:GGML_AVX" "avx2:GGML_AVX2" "fma:GGML_FMA" "f16c:GGML_F16C" "bmi2:GGML_BMI2" \
        "avx_vnni:GGML_AVX_VNNI" "avx512f:GGML_AVX512" "avx512vbmi:GGML_AVX512_VBMI" \
        "avx512_vnni:GGML_AVX512_VNNI" "avx512_bf16:GGML_AVX512_BF16"; do
        if [[ $flags == *" ${f%%:*} "* ]]; then isa_flags+=("-D${f#*:}=ON"); else isa_flags+=("-D${f#*:}=OFF"); fi
    done
    echo "${isa_flags[@]}"
}

build_s="cached"
ll_targets=()
llamacpp_build() {
    local mode="$1" isa t missing=()
    shift
    ll_targets=("$@")
    ll_mode="$mode"
    build_dir="$llama/build-$mode"
    if [[ $mode == native ]]; then isa="-DGGML_NATIVE=ON"; else isa="$(llamacpp_explicit_flags)"; fi
    # shellcheck disable=SC2206  # isa is a list of -D flags
    build_flags=(-DCMAKE_BUILD_TYPE=Release $isa -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF
        -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_APP=OFF
        -DLLAMA_OPENSSL=OFF -DGGML_BACKEND_DL=OFF)
    for t in "$@"; do [[ -x $build_dir/bin/$t ]] || missing+=("$t"); done
    if [[ "$(cat "$build_dir/.edgellm-bench-flags" 2>/dev/null)" == "${build_flags[*]}" ]]; then
        if ((${#missing[@]} == 0)); then
            say "using the cached llama.cpp build $build_dir"
            return 0
        fi
        # Same configuration: build only the missing targets (the libraries are already built).
        say "building llama.cpp ($llversion, $mode) targets ${missing[*]} in the cached $build_dir"
    else
        say "building llama.cpp ($llversion, $mode): cmake ${build_flags[*]}"
        rm -rf "$build_dir"
        missing=("$@")
    fi
    local t0=$SECONDS log="$ll_logs/cmake-$mode.log"
    mkdir -p "$ll_logs"
    ((${#missing[@]} < $#)) || : >"$log"
    if ! cmake -S "$llama" -B "$build_dir" "${build_flags[@]}" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "cmake configure failed (log: $log)"
    fi
    if ! cmake --build "$build_dir" --config Release -j "$(nproc)" --target "${missing[@]}" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "llama.cpp build failed (log: $log)"
    fi
    build_s=$((SECONDS - t0))
    echo "${build_flags[*]}" >"$build_dir/.edgellm-bench-flags"
    say "built ${missing[*]} in ${build_s} s"
}

llamacpp_build_default() {
    if [[ ${LLAMA_NATIVE:-1} == 1 ]]; then llamacpp_build native "$@"; else llamacpp_build explicit "$@"; fi
}

run_ll() {
    local tool="$1"; shift
    local rc=0
    "$build_dir/bin/$tool" "$@" || rc=$?
    if [[ $rc == 132 && $ll_mode == native ]]; then
        say "$tool died with an illegal instruction (native build); rebuilding with explicit flags"
        llamacpp_build explicit "${ll_targets[@]}"
        rc=0
        "$build_dir/bin/$tool" "$@" || rc=$?
    fi
    return $rc
}

# The checkpoint -> bf16 GGUF step (lossless for a bf16 checkpoint). Two adaptations, made by a
# small wrapper around convert_hf_to_gguf.py (the files are not edited):
#   - Qwen2's set_vocab tries SentencePiece first and falls back to the GPT-2 BPE vocabulary on
#     FileNotFoundError (no tokenizer.model); without the sentencepiece module installed the
#     import fails first, so the wrapper raises FileNotFoundError when tokenizer.model is absent.
#   - the converter identifies the BPE pre-tokenizer by hashing the tokenization of a test
#     string; the random-init tokenizer (256 bytes + a few merges) matches no known hash, so when
#     it is not recognized the wrapper uses "qwen2" (Qwen2.5's).
llamacpp_convert_hf() {
    local ckpt="$1" out="$2" log="$3"
    say "converting: convert_hf_to_gguf.py $ckpt --outtype bf16 --outfile $out"
    if ! PYTHONPATH="$llama/gguf-py${PYTHONPATH:+:$PYTHONPATH}" \
        "$ll_py" - "$llama" "$ckpt" --outtype bf16 --outfile "$out" >"$log" 2>&1 <<'EOF'
# Runs llama.cpp's convert_hf_to_gguf.py with two adaptations (see the script's header).
import runpy
import sys
from pathlib import Path

llama = Path(sys.argv[1])
sys.path[:0] = [str(llama), str(llama / "gguf-py")]
from conversion import base  # noqa: E402  (llama.cpp's converter package)

orig_spm = base.TextModel._create_vocab_sentencepiece


def create_vocab_sentencepiece(self):
    # No tokenizer.model: the FileNotFoundError set_vocab expects (not sentencepiece's ImportError).
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return orig_spm(self)


orig_pre = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return orig_pre(self, tokenizer)
    except NotImplementedError:
        print("llamacpp-lib: BPE pre-tokenizer not recognized (random-init tokenizer); using 'qwen2'",
              file=sys.stderr)
        return "qwen2"


base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [str(llama / "convert_hf_to_gguf.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
    then
        tail -n 30 "$log" >&2
        die "convert_hf_to_gguf.py failed (log: $log)"
    fi
}
