"""Output folders written atomically: everything goes into a private temporary folder beside OUTDIR (:func:`prepare`)
that is renamed into place at the end (:func:`publish`); a failure removes it (:func:`staged` does both)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitc.compiler.errors import OutputError


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


def prepare(outdir: Path, force: bool) -> Path:
    """Check OUTDIR can be (re)placed and make the private temporary folder beside it that the build writes into."""
    outdir = outdir.absolute()
    real = outdir.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{outdir}: is the current folder or one of its parents",
                          hint="choose a new folder for -o, e.g. -o build/model")
    if outdir.is_symlink():
        raise OutputError(f"{outdir}: is a symbolic link", hint="give the real folder path for -o")
    if outdir.exists() and not force:
        raise OutputError(f"{outdir}: already exists", hint="choose another -o or pass --force to replace it")
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a directory", hint="choose another -o or remove that file")
    parent = outdir.parent
    for p in (parent, *parent.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{outdir}: cannot create it, {p} is not a folder", hint="choose another -o")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.vitc-tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{outdir}: cannot write in {parent} ({exc.strerror})",
                          hint="choose a writable -o") from None
    return tmp


@contextmanager
def staged(outdir: Path, force: bool) -> Iterator[Path]:
    """``with staged(OUTDIR, force) as tmp:`` write into ``tmp``; on success it becomes OUTDIR, on any failure
    (Ctrl-C included) it is removed and nothing is left behind."""
    tmp = prepare(outdir, force)
    try:
        yield tmp
        publish(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
