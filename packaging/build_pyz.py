"""Build fluxrt.pyz: fluxrt and every dependency in one file, run with `python3 fluxrt.pyz`.

Usage: python packaging/build_pyz.py [--python PYTHON] [--output PATH]

The pyz holds compiled extensions (asyncpg, orjson, cryptography, PyYAML...) for the Python that builds it: it runs
on hosts with the same Python minor version, CPU architecture and a glibc at least as new as the wheels need
(manylinux). Build with that Python for another target. shiv unpacks on first start and compiles every module then
(--compile-pyc), so later starts load bytecode even where PYTHONDONTWRITEBYTECODE is set.

After shiv, the archive is rewritten: our launcher becomes __main__.py (packaging/launcher.py says why), debug
information is stripped from extension modules (`strip --strip-debug`, when binutils is installed) and C/Cython
sources that wheels carry along are left out; pglast's parser alone shrinks from 28 MB to a fraction of that.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"


def build(python: str, output: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "shiv.pyz"
        subprocess.run(
            [python, "-m", "shiv", "--compressed", "--reproducible", "--compile-pyc", "-c", "fluxrt",
             "-o", str(plain), "-p", "/usr/bin/env python3", "--quiet", str(ROOT)],
            check=True,
        )  # fmt: skip
        with_launcher = Path(tmp) / "fluxrt.pyz"
        _replace_main(plain, with_launcher)
        shutil.move(with_launcher, output)
    output.chmod(0o755)


_SOURCES = (".c", ".h", ".pyx", ".pxd", ".pxi")
"""compiled-extension sources shipped in wheels; nothing imports them"""


def _replace_main(source: Path, target: Path) -> None:
    """Copy the zipapp with our launcher as __main__.py, stripped extensions and without extension sources,
    keeping the shebang line and reproducible timestamps."""
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
                        content = LAUNCHER.read_bytes()
                    elif strip and name.endswith(".so"):
                        content = _stripped(strip, zin.read(info))
                    else:
                        content = zin.read(info)
                    zout.writestr(info, content)


def _stripped(strip: str, library: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".so") as tmp:
        tmp.write(library)
        tmp.flush()
        subprocess.run([strip, "--strip-debug", tmp.name], check=True)
        return Path(tmp.name).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python to build for (default: this one)")
    parser.add_argument("--output", type=Path, default=ROOT / "fluxrt.pyz")
    args = parser.parse_args()
    build(args.python, args.output)
    print(f"built {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
