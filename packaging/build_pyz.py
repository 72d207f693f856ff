"""Build fluxrt.pyz: fluxrt and every dependency in one file, run with `python3 fluxrt.pyz`.

Usage: python packaging/build_pyz.py [--python PYTHON] [--also-python PYTHON ...] [--output PATH]

The pyz holds compiled extensions (asyncpg, orjson, cryptography, PyYAML...) for the Python that builds it: it runs
on hosts with the same Python minor version, CPU architecture and a glibc at least as new as the wheels need
(manylinux). Each `--also-python` adds the extension modules of the same library versions built for that
interpreter (their file names carry the version, so they sit side by side), and any library only it requires: the
pyz then runs on that minor version too. Build with another Python for another target.

shiv unpacks on first start and compiles every module then (--compile-pyc), so later starts load bytecode even where
PYTHONDONTWRITEBYTECODE is set.

After shiv, the archive is rewritten: our launcher becomes __main__.py (packaging/launcher.py says why), debug
information is stripped from extension modules (`strip --strip-debug`, when binutils is installed) and C/Cython
sources that wheels carry along are left out; pglast's parser alone shrinks from 28 MB to a fraction of that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"


def build(python: str, output: Path, also: list[str] = []) -> None:  # noqa: B006 (never mutated)
    versions = [_version(p) for p in (python, *also)]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "shiv.pyz"
        subprocess.run(
            [python, "-m", "shiv", "--compressed", "--reproducible", "--compile-pyc", "-c", "fluxrt",
             "-o", str(plain), "-p", "/usr/bin/env python3", "--quiet", str(ROOT)],
            check=True,
        )  # fmt: skip
        extra: dict[str, bytes] = {}
        for i, other in enumerate(also):
            extra.update(_for_another_python(other, plain, Path(tmp) / f"also-{i}"))
        with_launcher = Path(tmp) / "fluxrt.pyz"
        _replace_main(plain, with_launcher, extra, versions)
        shutil.move(with_launcher, output)
    output.chmod(0o755)


def _for_another_python(python: str, pyz: Path, target: Path) -> dict[str, bytes]:
    """The files `python` needs beyond the pyz's site-packages: its builds of the same distributions' extension
    modules, and whole distributions that only it requires (by environment markers)."""
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
    tops = {name.split("/")[1] for name in names if name.startswith("site-packages/") and name.count("/") >= 1}
    pins = []
    for top in tops:
        if top.endswith(".dist-info"):
            dist, version = top[: -len(".dist-info")].rsplit("-", 1)
            if dist != "fluxrt_trio":
                pins.append(f"{dist}=={version}")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
         "--target", str(target), *sorted(pins)],
        check=True,
    )  # fmt: skip
    suffix = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    files = {}
    for path in sorted(target.rglob("*")):
        relative = path.relative_to(target)
        # Scripts are not needed, and bytecode is compiled on the host at first start.
        if not path.is_file() or relative.parts[0] == "bin" or "__pycache__" in relative.parts:
            continue
        if path.name.endswith(suffix) or relative.parts[0] not in tops:
            files[f"site-packages/{relative.as_posix()}"] = path.read_bytes()
    return files


_SOURCES = (".c", ".h", ".pyx", ".pxd", ".pxi")
"""compiled-extension sources shipped in wheels; nothing imports them"""


def _version(python: str) -> tuple[int, int]:
    out = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"], check=True, capture_output=True, text=True
    )
    major, minor = out.stdout.split()
    return int(major), int(minor)


def next_minor(python: str) -> str | None:
    """An interpreter of the minor version after `python`'s: on PATH, else installed by pyenv; None if neither."""
    major, minor = _version(python)
    name = f"python{major}.{minor + 1}"
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in (shutil.which(name), *sorted(pyenv.glob(f"{major}.{minor + 1}.*/bin/{name}"), reverse=True)):
        if candidate is None:
            continue
        # A pyenv shim may refuse to run a version that is not selected; the interpreter itself always runs.
        out = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def _launcher(versions: list[tuple[int, int]]) -> bytes:
    text = LAUNCHER.read_text()
    assert "\nSUPPORTED = ()\n" in text
    return text.replace("\nSUPPORTED = ()\n", f"\nSUPPORTED = {tuple(versions)!r}\n").encode()


def _replace_main(source: Path, target: Path, extra: dict[str, bytes], versions: list[tuple[int, int]]) -> None:
    """Copy the zipapp with our launcher as __main__.py, stripped extensions, without extension sources and with
    the `extra` files, keeping the shebang line and reproducible timestamps."""
    data = source.read_bytes()
    strip = shutil.which("strip")
    with zipfile.ZipFile(source) as zin:
        shebang = data[: zin.infolist()[0].header_offset] if zin.infolist() else b""
        with target.open("wb") as out:
            out.write(shebang)
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zout:
                for info in zin.infolist():
                    name = info.filename
                    if name.startswith("site-packages/") and name.endswith(_SOURCES):
                        continue
                    if name == "__main__.py":
                        content = _launcher(versions)
                    elif strip and name.endswith(".so"):
                        content = _stripped(strip, zin.read(info))
                    else:
                        content = zin.read(info)
                    zout.writestr(info, content)
                for name, content in extra.items():
                    if name.endswith(_SOURCES):
                        continue
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zout.writestr(info, _stripped(strip, content) if strip and name.endswith(".so") else content)


def _stripped(strip: str, library: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".so") as tmp:
        tmp.write(library)
        tmp.flush()
        subprocess.run([strip, "--strip-debug", tmp.name], check=True)
        return Path(tmp.name).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python to build for (default: this one)")
    parser.add_argument(
        "--also-python", action="append", default=[], help="another interpreter the pyz must run on (repeatable)"
    )
    parser.add_argument(
        "--also-next", action="store_true", help="also the next minor version's interpreter, when it is on PATH"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "fluxrt.pyz")
    args = parser.parse_args()
    also = list(args.also_python)
    if args.also_next:
        following = next_minor(args.python)
        if following is None:
            print("no interpreter of the next minor version on PATH or in pyenv: building for one version only")
        else:
            also.append(following)
    build(args.python, args.output, also)
    runs_on = ", ".join(f"{major}.{minor}" for major, minor in (_version(p) for p in (args.python, *also)))
    print(f"built {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), for Python {runs_on}")


if __name__ == "__main__":
    main()
