"""Pick SAE features by meaning: search Neuronpedia's public explanation exports.

Neuronpedia publishes its auto-interp explanations as gzipped JSON lines, one file per batch of
features: ``<model>/<source>/explanations/batch-<N>.jsonl.gz`` in its public datasets bucket.
Each line is one explanation of one feature, with (among others) the fields ``modelId``
(e.g. ``gemma-2-2b``), ``layer`` (the source, e.g. ``12-gemmascope-res-16k``), ``index`` (the
feature's index, a string in the exports) and ``description``; ``typeName`` and
``explanationModelName`` say how it was written. A feature may have several explanations.

`pack search` reads downloaded export files (this project never fetches them: the machine
that runs it need not reach the internet) and lists the features whose descriptions contain
every word of a query. `pack build --explanations` records each chosen feature's descriptions
and Neuronpedia id in the pack, so a rule's SAE feature says what it is meant to mean and
where that came from.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.features.errors import FeatureError

_WORD = re.compile(r"[a-z0-9]+")
MAX_DESCRIPTION = 500  # characters kept per description: they are free text from a third party


@dataclass
class FeatureExplanations:
    """Every explanation an export holds for one feature."""

    model: str
    source: str
    index: int
    descriptions: list[str] = field(default_factory=list)
    explainers: list[str] = field(default_factory=list)  # typeName / explanationModelName

    @property
    def neuronpedia_id(self) -> str:
        """``'<model>/<source>/<index>'``, the feature's id on Neuronpedia."""
        return f"{self.model}/{self.source}/{self.index}"


def export_files(paths: Sequence[str | Path]) -> list[Path]:
    """The export files under ``paths`` (files, or directories searched for
    ``batch-*.jsonl.gz`` and ``*.jsonl``), in natural batch order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [*path.rglob("*.jsonl.gz"), *path.rglob("*.jsonl")]
            if not found:
                raise FeatureError("no *.jsonl.gz or *.jsonl export files", where=path)
            files.extend(sorted(found, key=_natural))
        elif path.is_file():
            files.append(path)
        else:
            raise FeatureError("file not found", where=path)
    return files


def _natural(path: Path) -> list[Any]:
    return [
        int(part) if part.isascii() and part.isdigit() else part
        for part in re.split(r"([0-9]+)", str(path))
    ]


def read_explanations(
    paths: Sequence[str | Path],
) -> dict[tuple[str, str, int], FeatureExplanations]:
    """All features of the export files, keyed by (model, source, index)."""
    features: dict[tuple[str, str, int], FeatureExplanations] = {}
    for path in export_files(paths):
        for number, item in _lines(path):
            where = f"{path}:{number}"
            model, source = _text(item, "modelId", where), _text(item, "layer", where)
            index = _index(item, where)
            description = _text(item, "description", where)
            key = (model, source, index)
            entry = features.setdefault(key, FeatureExplanations(model, source, index))
            entry.descriptions.append(_clean(description))
            entry.explainers.append(
                " ".join(
                    _clean(str(item[k]))
                    for k in ("typeName", "explanationModelName")
                    if isinstance(item.get(k), str)
                )
            )
    return features


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise FeatureError(f"cannot read export file: {exc}", where=path) from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FeatureError(f"invalid JSON ({exc.msg})", where=f"{path}:{number}") from None
        if not isinstance(item, dict):
            raise FeatureError("expected a JSON object", where=f"{path}:{number}")
        yield number, item


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise FeatureError("missing or not a non-empty string", where=where, field=key)
    return value.strip()


def _index(item: dict[str, Any], where: str) -> int:
    value = item.get("index")
    # The exports write the index as a string; accept an integer too.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise FeatureError(
        f"expected a non-negative integer, got {value!r}", where=where, field="index"
    )


def _clean(text: str) -> str:
    """Third-party text: printable characters only, bounded length."""
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(flat.split())[:MAX_DESCRIPTION]


def search(
    features: Iterable[FeatureExplanations],
    query: str,
    *,
    model: str | None = None,
    source: str | None = None,
    limit: int = 20,
) -> list[FeatureExplanations]:
    """Features one of whose descriptions contains every word of ``query`` (case-insensitive,
    words matched as prefixes, so 'decept' finds 'deceptive'); the most specific first (the
    shortest matching description), then by index."""
    terms = _WORD.findall(query.lower())
    if not terms:
        raise FeatureError("the query has no words", field="query")
    hits: list[tuple[int, FeatureExplanations]] = []
    for feature in features:
        if (model and feature.model != model) or (source and feature.source != source):
            continue
        lengths = [
            len(description)
            for description in feature.descriptions
            if _matches(terms, _WORD.findall(description.lower()))
        ]
        if lengths:
            hits.append((min(lengths), feature))
    hits.sort(key=lambda hit: (hit[0], hit[1].model, hit[1].source, hit[1].index))
    return [feature for _, feature in hits[:limit]]


def _matches(terms: list[str], words: list[str]) -> bool:
    return all(any(word.startswith(term) for word in words) for term in terms)


def describe(
    features: dict[tuple[str, str, int], FeatureExplanations],
    indices: Sequence[int],
    neuronpedia_source: str | None,
) -> dict[int, FeatureExplanations]:
    """The explanations of SAE ``indices`` from one (model, source) of an export: the one
    named ``'<model>/<source>'``, or the only one the export holds."""
    sources = sorted({(m, s) for m, s, _ in features})
    if neuronpedia_source is not None:
        model, _, source = neuronpedia_source.partition("/")
        if (model, source) not in sources:
            listed = ", ".join(f"{m}/{s}" for m, s in sources) or "none"
            raise FeatureError(
                f"{neuronpedia_source!r} is not in the export (it holds {listed})",
                field="neuronpedia_source",
            )
    elif len(sources) == 1:
        model, source = sources[0]
    else:
        listed = ", ".join(f"{m}/{s}" for m, s in sources)
        raise FeatureError(
            f"the export holds several sources ({listed}): name one with --neuronpedia-source",
            field="neuronpedia_source",
        )
    return {i: features[(model, source, i)] for i in indices if (model, source, i) in features}
