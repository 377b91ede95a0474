"""The repository stands on its own: no tracked text file cites the internal notes file that lives
outside it (its documents and code cite the papers themselves instead)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".json"}
SKIPPED_DIRS = {".venv", "venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
                ".ruff_cache", "node_modules"}
# assembled so that this file does not match itself
FORBIDDEN = "PAPERS" + ".md"


def tracked_files() -> list[Path]:
    """The files git tracks, or, without git (or outside a checkout), every file under the root
    except virtual environments, build outputs and caches."""
    if shutil.which("git"):
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
        if listing.returncode == 0 and listing.stdout:
            return [ROOT / name for name in listing.stdout.decode().split("\0") if name]
    return [path for path in ROOT.rglob("*")
            if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts[:-1])
            and not any(part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)]


def test_no_tracked_file_cites_the_external_notes():
    this_file = Path(__file__).resolve()
    files = [p for p in tracked_files() if p.suffix in SUFFIXES and p.is_file() and p.resolve() != this_file]
    assert files, "found no text files to check"
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, (f"{FORBIDDEN} is not part of the repository; cite the paper instead:\n"
                           + "\n".join(offenders))
