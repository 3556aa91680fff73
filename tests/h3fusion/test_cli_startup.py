"""`h3fusion --help` stays fast: building the parser and `import h3fusion` load neither torch, transformers nor the
compiled extension (those take seconds; the CLI imports them only inside the subcommand that runs)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "transformers", "h3fusion_ext", "numpy")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_h3fusion_loads_nothing_heavy():
    proc = _run(f"import sys, h3fusion; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_every_help_loads_nothing_heavy():
    # the top-level help and each subcommand's help build the same parser: none of them may import heavy modules
    code = f"""
import contextlib, io, sys
from h3fusion.cli import SUBCOMMANDS, main
for argv in [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert "usage:" in out.getvalue(), argv
print([m for m in {HEAVY!r} if m in sys.modules])
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"heavy modules imported by --help: {proc.stdout}"


def test_public_names_resolve_lazily():
    # every name h3fusion advertises exists once asked for (a typo in the lazy table would only show here)
    import h3fusion

    for name in h3fusion.__all__:
        assert getattr(h3fusion, name) is not None, name
