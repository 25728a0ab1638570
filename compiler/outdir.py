"""Publishing an output folder atomically: everything is written into a private temporary folder beside OUTDIR
(:func:`vitc.compiler.build._prepare_outdir`) and renamed into place at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(tmp: Path, outdir: Path) -> Path:
    """Replace ``outdir`` by ``tmp`` (made an ordinary folder under the current umask) and return its path."""
    final = outdir.absolute()
    if final.exists():
        shutil.rmtree(final)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
    os.replace(tmp, final)
    return final
