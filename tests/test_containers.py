"""The Apptainer definitions in containers/ and the pinned requirement files in envs/.

Apptainer cannot be installed here, so the images are not built: each definition is
parsed (spython), and checked for the sections a usable image needs, a pinned base
image, pinned apt and pip installs, and %files sources that exist (or are documented
as supplied by the user). Every image named by the config has a definition.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
ENVS = REPO / "envs"
TOOLS = {"conveyor", "relion", "motioncor2", "ctffind", "dragonfly", "spi-tools"}
DEFS = sorted(CONTAINERS.glob("*.def"))
REQUIRED_SECTIONS = ["labels", "help", "environment", "post", "runscript", "test"]
USER_SUPPLIED = "containers/bin/"

# pip options that take a value (the value is not a package)
PIP_OPTS_WITH_VALUE = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "--no-binary",
    "--only-binary", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--prefix", "--root", "--src", "--upgrade-strategy",
    "--progress-bar", "--platform", "--python-version", "--implementation", "--abi",
    "-C", "--config-settings", "--global-option", "--log", "--cache-dir",
}
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[0-9][^\s;,<>=!~*]*$")


def sections(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(header keys, {section: lines}) of a definition file."""
    header: dict[str, str] = {}
    body: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            current = m.group(1).lower()
            body.setdefault(current, [])
            continue
        if current is None:
            h = re.match(r"^\s*(\w+)\s*:\s*(\S.*?)\s*$", line)
            if h and not line.lstrip().startswith("#"):
                header[h.group(1).lower()] = h.group(2)
        else:
            body[current].append(line)
    return header, body


def commands(lines: list[str]) -> list[str]:
    """Shell commands of a section: continuation lines joined, comments dropped, split
    at ; && ||."""
    joined, buf = [], ""
    for raw in lines:
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    if buf:
        joined.append(buf)
    out = []
    for cmd in joined:
        out += [c.strip() for c in re.split(r"&&|\|\||;", cmd) if c.strip()]
    return out


def requirement_lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def parser():
    mod = pytest.importorskip("spython.main.parse.parsers")
    return mod.SingularityParser


def test_one_definition_per_tool():
    assert TOOLS <= {d.stem for d in DEFS}, sorted(d.name for d in DEFS)


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_definition_parses_and_has_a_test(path, parser):
    recipe = parser(str(path)).recipe
    layer = next(iter(recipe.values()))
    assert layer.fromHeader, "no From: image"
    assert layer.test, "no %test section"
    assert layer.install, "no %post section"


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_sections_and_labels(path):
    header, body = sections(path)
    for name in REQUIRED_SECTIONS:
        assert any(ln.strip() for ln in body.get(name, [])), f"%{name} missing or empty"
    labels = dict(ln.strip().split(None, 1) for ln in body["labels"] if ln.strip())
    version = labels.get("org.opencontainers.image.version", "")
    assert re.search(r"\d", version), "label org.opencontainers.image.version needs a version"


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_base_image_is_pinned(path):
    header, _ = sections(path)
    assert header.get("bootstrap") == "docker", header
    image = header.get("from", "")
    assert image, "no From:"
    if "@sha256:" in image:
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), image
        return
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    assert tag != "latest" and re.search(r"\d", tag), f"{image}: tag is not a version"


def apt_packages(cmd: str) -> list[str] | None:
    tokens = shlex.split(cmd)
    for i, tok in enumerate(tokens):
        if tok in ("apt-get", "apt") and "install" in tokens[i + 1:]:
            rest = tokens[tokens.index("install", i) + 1:]
            return [t for t in rest if not t.startswith("-")]
    return None


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_apt_installs_are_pinned(path):
    _, body = sections(path)
    for cmd in commands(body.get("post", [])):
        pkgs = apt_packages(cmd)
        if pkgs is None:
            continue
        assert pkgs, cmd
        for pkg in pkgs:
            assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]*=[0-9A-Za-z.+:~-]+", pkg), (
                f"{path.name}: apt package not pinned as name=version: {pkg}")


def pip_arguments(cmd: str) -> list[str] | None:
    tokens = shlex.split(cmd)
    for i, tok in enumerate(tokens):
        if (tok == "pip" or tok.endswith("/pip") or re.fullmatch(r"pip3(\.\d+)?", tok)) \
                and i + 1 < len(tokens) and tokens[i + 1] == "install":
            return tokens[i + 2:]
    return None


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_pip_installs_are_pinned(path):
    _, body = sections(path)
    for cmd in commands(body.get("post", [])):
        args = pip_arguments(cmd)
        if args is None:
            continue
        no_deps = "--no-deps" in args
        i = 0
        while i < len(args):
            tok = args[i]
            if tok in PIP_OPTS_WITH_VALUE:
                value = args[i + 1]
                if tok in ("-r", "--requirement", "-c", "--constraint"):
                    req = ENVS / Path(value).name
                    assert Path(value).parent.name == "envs" and req.exists(), (
                        f"{path.name}: requirement file {value} is not one of envs/")
                    for line in requirement_lines(req):
                        assert PIN.match(line), f"{req.name}: not pinned: {line}"
                elif tok in ("-e", "--editable"):
                    assert no_deps, f"{path.name}: local install without --no-deps: {cmd}"
                i += 2
                continue
            if tok.startswith("-"):
                i += 1
                continue
            if tok.startswith(("/", ".")):
                # the package from the copied sources; its dependencies come pinned
                # from envs/
                assert no_deps, f"{path.name}: local install without --no-deps: {cmd}"
            else:
                assert PIN.match(tok), f"{path.name}: pip package not pinned with ==: {tok}"
            i += 1


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_files_exist_or_are_documented(path):
    _, body = sections(path)
    readme = (CONTAINERS / "README.md").read_text()
    text = path.read_text()
    for line in body.get("files", []):
        if not line.strip() or line.strip().startswith("#"):
            continue
        src = line.split()[0]
        if src.startswith(USER_SUPPLIED):
            # a binary the user downloads: the path is documented where they look
            assert src in readme, f"{src} is not documented in containers/README.md"
            assert text.count(src.rstrip("/")) >= 2, f"{src} is not explained in {path.name}"
        else:
            assert (REPO / src).exists(), f"{path.name}: %files source {src} does not exist"


def test_envs_are_pinned():
    files = sorted(ENVS.glob("*.txt"))
    assert {"conveyor.txt", "build.txt"} <= {f.name for f in files}
    for req in files:
        lines = requirement_lines(req)
        assert lines, req.name
        for line in lines:
            assert PIN.match(line), f"{req.name}: not pinned: {line}"


def test_conveyor_requirements_cover_the_package():
    """Every dependency in pyproject.toml is pinned in envs/conveyor.txt."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {re.split(r"[\[=]", ln, 1)[0].lower().replace("_", "-")
              for ln in requirement_lines(ENVS / "conveyor.txt")}
    for dep in project["dependencies"]:
        name = re.split(r"[\s\[<>=!~;]", dep, 1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} (pyproject.toml) is not pinned in envs/conveyor.txt"


def test_python_images_agree():
    """The images that carry conveyor use one Python (one set of wheels)."""
    bases = set()
    for path in DEFS:
        header, body = sections(path)
        if any("conveyor" in ln for ln in body.get("files", [])):
            bases.add(header["from"])
    assert len(bases) == 1, bases


def configured_images() -> dict[str, str]:
    """{tool: image} from config/config.yaml's containers: section, else the schema's
    defaults."""
    config = REPO / "config" / "config.yaml"
    if config.exists():
        data = yaml.safe_load(config.read_text()) or {}
        if data.get("containers"):
            return dict(data["containers"])
    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    if schema.exists():
        props = (yaml.safe_load(schema.read_text()) or {}).get("properties", {})
        images = props.get("containers", {}).get("properties", {})
        if images:
            return {k: v.get("default", "") for k, v in images.items()}
    if not config.exists():
        pytest.skip("config/config.yaml does not exist yet")
    pytest.skip("no containers: section in config/config.yaml or the schema")


def test_configured_images_have_definitions():
    for tool, image in configured_images().items():
        assert (CONTAINERS / f"{tool}.def").exists(), f"containers/{tool}.def missing"
        image = str(image or "")
        if image.endswith(".sif") and "://" not in image:
            stem = Path(image).stem
            assert (CONTAINERS / f"{stem}.def").exists(), (
                f"{tool}: image {image} has no containers/{stem}.def")
