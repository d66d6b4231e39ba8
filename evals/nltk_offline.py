"""Offline NLTK data for lm-eval's IFEval checkers.

`lm_eval.tasks.ifeval.instructions_util` calls `nltk.download('punkt_tab')` at import when the English Punkt
sentence tokenizer is missing; offline that fails. This module builds the `punkt_tab/english` parameters
itself (NLTK's own `PunktTrainer` over the project's prose plus common English abbreviations), stores them
under the cache directory and puts that directory on NLTK's search path (and `NLTK_DATA`, for subprocesses
such as the `lm_eval` CLI), before anything imports the IFEval checkers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import nltk
from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

from forgetting.evals.prose import PARAGRAPHS
from forgetting.harness.io import cache_root

ABBREVIATIONS = [
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "u.s",
    "u.k",
    "inc",
    "ltd",
    "co",
    "corp",
    "no",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "fig",
    "approx",
    "dept",
    "est",
    "min",
    "max",
    "a.m",
    "p.m",
]
FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    return cache_root() / "nltk_data"


def ensure_punkt_tab() -> Path:
    """Build (once) and register the English punkt_tab data; return the NLTK data directory."""
    root = nltk_data_dir()
    target = root / "tokenizers" / "punkt_tab" / "english"
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    os.environ["NLTK_DATA"] = os.pathsep.join(
        dict.fromkeys([str(root), *filter(None, os.environ.get("NLTK_DATA", "").split(os.pathsep))])
    )
    if all((target / name).is_file() for name in FILES):
        return root
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train("\n\n".join(PARAGRAPHS), finalize=True)
    params = trainer.get_params()
    params.abbrev_types.update(ABBREVIATIONS)
    staging = target.parent / ".staging-english"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    save_punkt_params(params, dir=str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    return root


def punkt_tab_hash() -> str:
    """BLAKE2 of the English punkt_tab data the IFEval checkers use (lines sorted: they are written from sets)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((ensure_punkt_tab() / "tokenizers" / "punkt_tab" / "english").iterdir()):
        digest.update(path.name.encode() + b"\n" + "\n".join(sorted(path.read_text().splitlines())).encode())
    return digest.hexdigest()
