"""The output folder of ``evaluate``: results appended as they are computed, resumable, never silently replaced.

Files in ``out_dir``:

- ``results.jsonl``: one row per manifest line (key ``line``), appended and flushed as each is computed, so a
  kill or Ctrl-C keeps every finished row; rewritten sorted by line (atomically) when the run completes.
- ``evaluate_run.json``: what the rows were computed from: the manifest's SHA-256 and the evaluation settings
  (face backend, embedding size, aesthetic on/off). A rerun with the same ones resumes: rows already done are
  kept (unless their generated image changed since: each row records the file's size and modification time).
  A rerun with another manifest or other settings is refused while rows exist, unless ``overwrite``.
- ``summary.md``: the tables, written atomically at the end.

``overwrite`` removes only these three files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import OutputError
from .jsonl import write_jsonl_atomic

__all__ = ["RESULTS", "SUMMARY", "RUN_FILE", "ResultStore", "check_output_dir", "manifest_sha256", "file_signature"]

log = logging.getLogger("idglow")
RESULTS, SUMMARY, RUN_FILE = "results.jsonl", "summary.md", "evaluate_run.json"
_RERUN = ("Pass --overwrite (overwrite=True) to replace them, or choose another output folder.")


def manifest_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_signature(path: str | os.PathLike) -> str:
    """``"size:mtime_ns"`` of a file: a row computed from an older version of the image is redone."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and prove a file can be written in it; raise :class:`OutputError` if not."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output folder '{out}' is a file. Pass a folder for --out (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"Cannot write into the output folder '{out}' ({exc.strerror or exc}). Choose a "
                          f"writable folder for --out, or fix its permissions / free disk space.") from exc
    return out


def _read_rows(path: Path) -> tuple[dict[int, dict], int]:
    """Rows by manifest line (the last one of a line wins) and the count of unreadable lines (a row cut short
    by a kill)."""
    rows, bad = {}, 0
    if not path.is_file():
        return rows, bad
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                row = json.loads(raw.decode("utf-8"))
                rows[int(row["line"])] = row
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                bad += 1
    return rows, bad


class ResultStore:
    """:meth:`prepare` (checks only), :attr:`done` (finished rows by manifest line), :meth:`start`,
    :meth:`append` per new row, :meth:`finish`."""

    def __init__(self, out: Path, done: dict[int, dict]):
        self.out, self.done = out, done
        self._fh = None
        self._run: dict = {}
        self._overwrite, self._bad = False, 0

    @classmethod
    def prepare(cls, out_dir: str | os.PathLike, run: dict, overwrite: bool = False,
                keys: tuple[str, ...] | None = None) -> "ResultStore":
        """Check the folder and read the finished rows; changes nothing on disk (call :meth:`start` once the
        inputs are checked). run: JSON-ready description of the evaluation (``manifest_sha256``, backend, ...);
        rows are reused only when it equals the stored one, else :class:`OutputError` unless ``overwrite``.
        keys: compare only these entries (an early check before the models that fill the others are loaded)."""
        out = check_output_dir(out_dir)
        rows, bad = ({}, 0) if overwrite else _read_rows(out / RESULTS)
        old = None
        if not overwrite and (out / RUN_FILE).is_file():
            try:
                old = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                old = None
        if keys is not None and old is not None:
            old = {k: old.get(k) for k in keys}
        if (rows or bad) and old != run:
            if old is None:
                raise OutputError(f"'{out}' already holds {RESULTS} ({len(rows)} rows) from an unknown run (no "
                                  f"readable {RUN_FILE}). {_RERUN}")
            changed = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            raise OutputError(f"'{out}' holds {len(rows)} result rows computed with a different "
                              f"{', '.join(changed)} (e.g. another manifest). {_RERUN}")
        store = cls(out, rows)
        store._run, store._overwrite, store._bad = run, overwrite, bad
        return store

    def start(self) -> None:
        """Remove the old files (``overwrite``), drop rows cut short by a kill, record the run, open for append."""
        results = self.out / RESULTS
        try:
            if self._overwrite:
                for name in (RESULTS, SUMMARY, RUN_FILE):
                    (self.out / name).unlink(missing_ok=True)
            elif self._bad:
                log.warning("dropping %d unreadable row(s) from %s (a run stopped mid-write)", self._bad, results)
                write_jsonl_atomic(self.rows(), results)
            _write_text_atomic(json.dumps(self._run, indent=2) + "\n", self.out / RUN_FILE)
            self._fh = open(results, "a", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"Cannot write results into '{self.out}' ({exc.strerror or exc}). Choose a writable "
                              f"folder or free disk space.") from exc

    def append(self, row: dict) -> None:
        """Write one finished row (``row["line"]`` = its manifest line) and flush it to disk."""
        try:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise OutputError(f"Cannot append to '{self.out / RESULTS}' ({exc.strerror or exc}); the {len(self.done)} "
                              f"rows written before are kept. Free disk space and rerun the same command to "
                              f"resume.") from exc
        self.done[int(row["line"])] = row

    def rows(self) -> list[dict]:
        return [self.done[k] for k in sorted(self.done)]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self, summary_md: str) -> None:
        """Rewrite ``results.jsonl`` sorted by line and write ``summary.md`` (both atomically)."""
        self.close()
        try:
            write_jsonl_atomic(self.rows(), self.out / RESULTS)
            _write_text_atomic(summary_md, self.out / SUMMARY)
        except OSError as exc:
            raise OutputError(f"Cannot write the final results into '{self.out}' ({exc.strerror or exc}); "
                              f"{RESULTS} still holds every row. Free disk space and rerun to resume.") from exc


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
