"""Packaging: sdist -> wheel -> a fresh venv outside the checkout -> `llmgw --version` and `llmgw cluster --demo`.

The steps are deploy/build.sh's, the same ones deploy/Dockerfile runs (so the image build is exercised here without
a container engine), with the extras the image installs (IMAGE_EXTRAS: tracing), so `--otel` is shown to work in
it. The venv is installed with the gRPC/protobuf family held at the minimums pyproject.toml declares, which proves
those minimums true: the generated modules refuse older runtimes at import.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "deploy" / "build.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PROTOS = sorted(p.stem for p in (ROOT / "proto").glob("*.proto"))
CORES = sorted(p.stem for p in (ROOT / "llmgw" / "_core").glob("*.pyx"))
# Packages whose lowest declared version the venv gets: the ones the generated code checks at import.
HELD_AT_MINIMUM = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")
# The extras deploy/Dockerfile installs by default (its ARG LLMGW_EXTRAS).
IMAGE_EXTRAS = "otel"

pytestmark = pytest.mark.slow


def requirement(name: str) -> Requirement:
    (req,) = [r for r in map(Requirement, PROJECT["dependencies"]) if r.name == name]
    return req


def minimum(req: Requirement) -> str:
    (spec,) = [s for s in req.specifier if s.operator == ">="]
    return spec.version


def build_requirement(name: str) -> Requirement:
    (req,) = [r for r in map(Requirement, PYPROJECT["build-system"]["requires"]) if r.name.lower() == name.lower()]
    return req


def run_step(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[str, float]:
    start = time.monotonic()
    result = subprocess.run(["sh", str(BUILD_SH), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHON": sys.executable, **(env or {})}, cwd="/")
    elapsed = time.monotonic() - start
    assert result.returncode == 0, f"build.sh {args[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr, elapsed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Wheel from the sdist, then a venv holding only that wheel[IMAGE_EXTRAS] and its dependencies (minimums for
    HELD_AT_MINIMUM), as the image's runtime stage installs it."""
    work = tmp_path_factory.mktemp("packaging")
    assert not work.resolve().is_relative_to(ROOT)
    dist, venv = work / "dist", work / "venv"
    constraints = work / "minimums.txt"
    constraints.write_text("".join(f"{name}=={minimum(requirement(name))}\n" for name in HELD_AT_MINIMUM))
    times = {}
    _, times["wheel"] = run_step("wheel", str(dist))
    _, times["install"] = run_step("install", str(dist), str(venv), IMAGE_EXTRAS,
                                   env={"PIP_CONSTRAINT": str(constraints)})
    (sdist,) = dist.glob("llmgw-*.tar.gz")
    (wheel,) = dist.glob("llmgw-*.whl")
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size} bytes; sdist -> wheel {times['wheel']:.1f} s, "
          f"venv + install {times['install']:.1f} s")
    return {"sdist": sdist, "wheel": wheel, "venv": venv, "times": times}


def test_sdist_carries_sources_not_build_outputs(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "tools/genproto.py"}
    expected |= {f"proto/{p}.proto" for p in PROTOS}
    expected |= {f"llmgw/_core/{c}.pyx" for c in CORES}
    expected |= {f"llmgw/_core/{p.name}" for p in (ROOT / "llmgw" / "_core").glob("*.pxd")}
    assert expected <= names, sorted(expected - names)
    leaked = [n for n in names if n.endswith((".c", ".so", "_pb2.py", "_pb2_grpc.py")) or n.startswith("tests/")]
    assert leaked == []


def test_wheel_carries_compiled_cores_and_generated_code_only(built):
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"llmgw-{PROJECT['version']}.dist-info/entry_points.txt").decode()
    for core in CORES:
        assert any(re.fullmatch(rf"llmgw/_core/{core}\.cpython-[^/]+\.so", n) for n in names), core
    for proto in PROTOS:
        assert {f"llmgw/_proto/{proto}_pb2.py", f"llmgw/_proto/{proto}_pb2_grpc.py"} <= names
    stubs = {f"llmgw/_core/{p.name}" for p in (ROOT / "llmgw" / "_core").glob("*.pyi")}
    stubs |= {f"llmgw/_proto/{proto}_pb2.pyi" for proto in PROTOS}
    assert stubs <= names, sorted(stubs - names)  # type stubs travel with the modules they describe
    assert [n for n in names if n.endswith((".c", ".pyx", ".pxd")) or n.startswith(("tests/", "tools/"))] == []
    assert "llmgw = llmgw.__main__:main" in entry_points
    # Cores built without debug info (-g0): a few hundred KB, not several MB.
    assert built["wheel"].stat().st_size < 2_000_000, built["wheel"].stat().st_size


def test_declared_minimums_are_what_the_generated_code_checks(built):
    """The wheel's generated modules check their runtime at import; pyproject.toml promises exactly that much, and
    [build-system] pins the generator that wrote them."""
    with zipfile.ZipFile(built["wheel"]) as archive:
        for proto in PROTOS:
            pb2 = archive.read(f"llmgw/_proto/{proto}_pb2.py").decode()
            check = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
                              r"\s*(\d+),", pb2)
            assert check, f"{proto}_pb2.py has no runtime version check"
            assert minimum(requirement("protobuf")) == ".".join(check.groups())
            grpc_module = archive.read(f"llmgw/_proto/{proto}_pb2_grpc.py").decode()
            generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_module).group(1)
            assert minimum(requirement("grpcio")) == generated
            (pin,) = build_requirement("grpcio-tools").specifier
            assert (pin.operator, pin.version) == ("==", generated)
    (cython_pin,) = build_requirement("Cython").specifier
    assert cython_pin.operator == "=="


def test_venv_holds_the_minimums_and_no_build_tools(built):
    python = built["venv"] / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    installed = dict(line.split("==", 1) for line in listed.split())
    installed = {name.lower().replace("_", "-"): version for name, version in installed.items()}
    for name in HELD_AT_MINIMUM:
        assert installed[name] == minimum(requirement(name)), name
    assert not {"cython", "grpcio-tools"} & set(installed)  # generators are build-time only
    # The otel extra, as pyproject.toml declares it: what `--otel` needs.
    otel = {Requirement(r).name for r in PROJECT["optional-dependencies"]["otel"]}
    assert otel and otel <= set(installed), sorted(otel - set(installed))


def test_install_step_refuses_malformed_extras(tmp_path):
    result = subprocess.run(["sh", str(BUILD_SH), "install", str(tmp_path), str(tmp_path / "venv"), "otel]; rm"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2
    assert "extras must be a comma-separated list of names like 'otel'" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_installed_wheel_runs_version_and_the_traced_demo_cluster_outside_the_tree(built):
    output, elapsed = run_step("smoke", str(built["venv"]), IMAGE_EXTRAS, timeout=300)
    assert re.search(rf"^llmgw {re.escape(PROJECT['version'])}$", output, flags=re.M), output[:500]
    assert "llmgw cluster ready:" in output and "tokens from replica-" in output and "llmgw cluster stopped" in output
    # The demo's gateway ran with tracing on (LLMGW_OTEL=1) and exported the demo requests' spans.
    spans = re.search(r"tracing: the demo's gateway exported (\d+) llmgw.request span", output)
    assert spans and int(spans.group(1)) >= 1, output[-2000:]
    print(f"\nsmoke (--version, cluster --demo): {elapsed:.1f} s")


def test_console_script_names_itself(built):
    result = subprocess.run([str(built["venv"] / "bin" / "llmgw"), "--help"], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: llmgw "), result.stdout[:200]


def _fake_tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _image_step(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # Only bin_dir on PATH, plus the few tools build.sh itself uses: whatever podman/buildah/docker this machine
    # has stays out of reach.
    for tool in ("dirname", "tail", "cat"):
        target = bin_dir / tool
        if not target.exists():
            target.symlink_to(next(Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()))
    return subprocess.run(["/bin/sh", str(BUILD_SH), "image", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(bin_dir), "PYTHON": sys.executable})


def test_image_step_says_why_it_cannot_build(tmp_path):
    _fake_tool(tmp_path, "docker", 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" >&2\n'
                                   "exit 1\n")
    result = _image_step(tmp_path)
    assert result.returncode == 2
    assert "no usable container builder" in result.stderr
    assert "podman: not installed" in result.stderr and "buildah: not installed" in result.stderr
    assert "docker: installed but 'docker info' fails (Cannot connect to the Docker daemon" in result.stderr


def test_image_step_builds_the_dockerfile_with_a_registry_qualified_name(tmp_path):
    calls = tmp_path / "calls"
    _fake_tool(tmp_path, "podman", f'echo "$*" >> {calls}\n')
    result = _image_step(tmp_path)
    assert result.returncode == 0, result.stderr
    info, build = calls.read_text().splitlines()
    assert info == "info"
    expected = (f"build --ignorefile {ROOT}/deploy/Dockerfile.dockerignore -f {ROOT}/deploy/Dockerfile "
                f"-t registry.example.com/llmgw/llmgw:{PROJECT['version']} {ROOT}")
    assert build == expected
    calls.unlink()
    assert _image_step(tmp_path, "ghcr.io/acme/llmgw:1.2.3").returncode == 0
    assert calls.read_text().splitlines()[1].endswith(f"-t ghcr.io/acme/llmgw:1.2.3 {ROOT}")


def test_dockerfile_runs_the_script_steps_as_non_root_without_the_source_tree():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2
    builder, runtime = stages
    assert " AS builder" in builder.splitlines()[0] and "deploy/build.sh wheel /dist" in builder
    assert "-slim" in runtime.splitlines()[0]  # no compiler in the runtime image
    assert "build.sh install /tmp/dist /opt/llmgw" in runtime
    # Tracing works in the image: the runtime installs the wheel with the extras the smoke test above ran with.
    assert re.search(rf"^ARG LLMGW_EXTRAS={IMAGE_EXTRAS}$", runtime, flags=re.M)
    assert 'build.sh install /tmp/dist /opt/llmgw "$LLMGW_EXTRAS"' in runtime
    assert "COPY . " not in runtime and "COPY --from=builder /src " not in runtime  # no source tree at run time
    user = re.search(r"^USER (\d+):(\d+)$", runtime, flags=re.M)
    assert user and int(user.group(1)) != 0
    # The manifests run the image as that same user (runAsNonRoot can only verify a numeric uid).
    import yaml

    for manifest in ("gateway.yaml", "replica.yaml"):
        pod = next(doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / manifest).read_text())
                   if doc["kind"] in ("Deployment", "StatefulSet"))["spec"]["template"]["spec"]
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == \
            (int(user.group(1)), int(user.group(2)))
    assert re.search(r'^ENTRYPOINT \["llmgw"\]$', runtime, flags=re.M)
