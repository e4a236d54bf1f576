#!/bin/sh
# The build steps of deploy/Dockerfile, in one script, so that the same steps run in the image build and, outside
# any container, in tests/test_packaging.py:
#
#   deploy/build.sh wheel   OUTDIR          sdist of this checkout, then the wheel built *from that sdist*
#                                           (Cython cores compiled, protobuf/gRPC code generated, generators pinned
#                                           in pyproject.toml's [build-system]); needs a C compiler and `build`
#   deploy/build.sh install WHEEL|DIR VENV [EXTRAS]
#                                           a fresh venv at VENV with only the wheel and its dependencies, all as
#                                           binary wheels (no compiler, no Cython, no source tree); EXTRAS, e.g.
#                                           "otel", installs llmgw[EXTRAS] (the image's default: tracing works)
#   deploy/build.sh smoke   VENV [EXTRAS]   from a directory outside any source tree: `llmgw --version`, then
#                                           `llmgw cluster --demo` (gateway + 3 replicas, one streamed completion);
#                                           with "otel" in EXTRAS the demo's gateway traces (LLMGW_OTEL=1) and
#                                           its spans must reach its log (console exporter)
#   deploy/build.sh image   [IMAGE]         build deploy/Dockerfile with podman, buildah or docker, whichever
#                                           works here; IMAGE defaults to $IMAGE, else
#                                           registry.example.com/llmgw/llmgw:<version> (a placeholder: name
#                                           your registry, e.g. ghcr.io/<owner>/llmgw:<version>)
#
# Every step prints how long it took ("build.sh: <step> took <s> s"). POSIX sh: the runtime image has no bash.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-python3}

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
now() { "$PYTHON" -c 'import time; print(time.monotonic())'; }
took() { say "$1 took $("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$2" "$(now)") s"; }

project_version() {
    "$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$ROOT/pyproject.toml"
}

cmd_wheel() {
    [ $# -eq 1 ] || die "usage: build.sh wheel OUTDIR"
    out=$1
    "$PYTHON" -c 'import build' 2>/dev/null || die "$PYTHON has no 'build' module: $PYTHON -m pip install build"
    mkdir -p "$out"
    rm -f "$out"/llmgw-*.tar.gz "$out"/llmgw-*.whl
    start=$(now)
    # Run from outside the checkout: the checkout's own build/ directory would otherwise shadow the `build`
    # module for `python -m build`. No --sdist/--wheel flags: `build` then makes the sdist and builds the wheel
    # from the unpacked sdist, so a file missing from the sdist fails here, not at a user's pip install.
    (cd / && "$PYTHON" -m build --outdir "$out" "$ROOT")
    took "wheel (sdist -> wheel)" "$start"
    set -- "$out"/llmgw-*.whl
    [ $# -eq 1 ] && [ -f "$1" ] || die "expected exactly one llmgw wheel in $out"
    say "wheel: $1 ($(wc -c <"$1") bytes)"
}

# A comma-separated list of extras of pyproject.toml ("" = none); anything else is refused before pip sees it.
check_extras() {
    case $1 in
        *[!A-Za-z0-9,_-]*) die "extras must be a comma-separated list of names like 'otel', got '$1'" ;;
    esac
}

cmd_install() {
    [ $# -eq 2 ] || [ $# -eq 3 ] || die "usage: build.sh install WHEEL|DIR VENV [EXTRAS]"
    wheel=$1 venv=$2 extras=${3:-}
    check_extras "$extras"
    if [ -d "$wheel" ]; then
        set -- "$wheel"/llmgw-*.whl
        [ $# -eq 1 ] && [ -f "$1" ] || die "expected exactly one llmgw wheel in $wheel"
        wheel=$1
    fi
    [ -f "$wheel" ] || die "no wheel at $wheel"
    [ ! -e "$venv" ] || die "$venv exists: install into a fresh directory"
    start=$(now)
    "$PYTHON" -m venv "$venv"
    # --only-binary: every dependency must come as a wheel, so this step can never reach for a compiler.
    "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
        "$wheel${extras:+[$extras]}"
    took "install (venv + wheel${extras:+[$extras]})" "$start"
}

cmd_smoke() {
    [ $# -eq 1 ] || [ $# -eq 2 ] || die "usage: build.sh smoke VENV [EXTRAS]"
    venv=$(cd "$1" && pwd)
    extras=${2:-}
    check_extras "$extras"
    [ -x "$venv/bin/llmgw" ] || die "$venv/bin/llmgw missing: run build.sh install first"
    start=$(now)
    # An empty working directory, so nothing can be imported from a source tree by accident.
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cd "$work"
    location=$("$venv/bin/python" -c 'import llmgw._core.swim, llmgw._proto.llmgateway_pb2_grpc as m; print(m.__file__)')
    case "$location" in
        "$venv"/*) ;;
        *) die "llmgw was imported from $location, not from $venv" ;;
    esac
    "$venv/bin/llmgw" --version
    case ",$extras," in
        *,otel,*)
            # The demo's gateway traces as `--otel` would (the variable reaches the members); the console
            # exporter writes its spans to the gateway's log, flushed when the demo stops it.
            LLMGW_OTEL=1 OTEL_TRACES_EXPORTER=console OTEL_BSP_SCHEDULE_DELAY=100 \
                timeout 120 "$venv/bin/llmgw" cluster --demo --base-port 0 --log-dir "$work/logs"
            spans=$(cat "$work"/logs/*.log | grep -c '"name": "llmgw.request"' || true)
            if [ "$spans" -lt 1 ]; then
                tail -n 20 "$work"/logs/*.log >&2 || true
                die "tracing on, but the demo's gateway exported no llmgw.request span (its log above)"
            fi
            say "tracing: the demo's gateway exported $spans llmgw.request span(s)"
            ;;
        *)
            timeout 120 "$venv/bin/llmgw" cluster --demo --base-port 0
            ;;
    esac
    took "smoke (--version, cluster --demo${extras:+, $extras})" "$start"
}

cmd_image() {
    [ $# -le 1 ] || die "usage: build.sh image [IMAGE]"
    image=${1:-${IMAGE:-registry.example.com/llmgw/llmgw:$(project_version)}}
    dockerfile="$HERE/Dockerfile"
    ignore="$HERE/Dockerfile.dockerignore"
    tool="" why=""
    for candidate in podman buildah docker; do
        if ! command -v "$candidate" >/dev/null 2>&1; then
            why="$why $candidate: not installed;"
            continue
        fi
        # A client without a working engine (no docker daemon, podman without user namespaces) cannot build.
        case $candidate in
            podman) probe="podman info" ;;
            buildah) probe="buildah info" ;;
            docker) probe="docker info" ;;
        esac
        if $probe >/dev/null 2>&1; then
            tool=$candidate
            break
        fi
        why="$why $candidate: installed but '$probe' fails ($($probe 2>&1 | tail -n 1));"
    done
    [ -n "$tool" ] || die "cannot build the image here, no usable container builder:$why" \
        "install podman or buildah, or start a docker daemon (the image's steps run without one: build.sh wheel," \
        "install, smoke)"
    start=$(now)
    case $tool in
        podman) podman build --ignorefile "$ignore" -f "$dockerfile" -t "$image" "$ROOT" ;;
        buildah) buildah bud --ignorefile "$ignore" -f "$dockerfile" -t "$image" "$ROOT" ;;
        docker) DOCKER_BUILDKIT=1 docker build -f "$dockerfile" -t "$image" "$ROOT" ;;
    esac
    took "image ($tool)" "$start"
    say "built $image; push it with: $tool push $image"
}

[ $# -ge 1 ] || die "usage: build.sh wheel|install|smoke|image ARGS (see the comment at the top)"
step=$1
shift
case $step in
    wheel) cmd_wheel "$@" ;;
    install) cmd_install "$@" ;;
    smoke) cmd_smoke "$@" ;;
    image) cmd_image "$@" ;;
    *) die "unknown step '$step': wheel, install, smoke or image" ;;
esac
