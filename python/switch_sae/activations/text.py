"""Text sources, and their tokenisation into fixed-length contexts.

A source is any of: a list of strings; a local text file or a folder of them; an HF
``datasets`` ``Dataset`` / ``IterableDataset`` (a ``text`` column, or a pre-tokenised
``tokens`` / ``input_ids`` column); or the name of a dataset for ``datasets.load_dataset``
(streamed by default). ``iter_documents`` turns any of them into documents (strings, or
lists of token ids when pre-tokenised).

``iter_contexts`` packs documents the way language models are trained: every document is
followed by a separator token (the tokenizer's EOS by default), the stream is cut into
windows of ``context_size - 1`` tokens, and each window starts with a BOS token, so every
context is exactly ``context_size`` long and there is no padding to mask. With
``prepend_bos=False`` windows are ``context_size`` raw tokens. ``bos_settings(model)``
reads what the model expects (TransformerLens's ``cfg.default_prepend_bos``).

What it leaves out: running the model (``harvest``) and shuffling (``buffer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.checks import check_int

TEXT_COLUMNS = ("text", "content")
TOKEN_COLUMNS = ("tokens", "input_ids")
DEFAULT_CONTEXT_SIZE = 128


def _text_files(folder: Path, pattern: str) -> list[Path]:
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"source folder {folder} holds no files matching {pattern!r}")
    return files


def _pick_column(names: Sequence[str], column: str | None) -> str:
    if column is not None:
        if column not in names:
            raise ValueError(f"column={column!r} is not in the dataset; it has {list(names)}")
        return column
    for name in (*TOKEN_COLUMNS, *TEXT_COLUMNS):
        if name in names:
            return name
    raise ValueError(f"the dataset has none of the columns {TOKEN_COLUMNS + TEXT_COLUMNS}; pass column=... (it has {list(names)})")


def _iter_rows(rows: Iterable[Any], column: str | None) -> Iterator[str | list[int]]:
    chosen = column
    for row in rows:
        if isinstance(row, str):
            yield row
            continue
        if not isinstance(row, dict):
            raise TypeError(f"a dataset row must be a dict or a string, got {type(row).__name__}")
        if chosen is None:
            chosen = _pick_column(list(row), column)
        value = row[chosen]
        yield value if isinstance(value, str) else [int(t) for t in value]


def iter_documents(
    source: Any,
    *,
    column: str | None = None,
    split: str = "train",
    streaming: bool = True,
    pattern: str = "*.txt",
    **load_kwargs: Any,
) -> Iterator[str | list[int]]:
    """Documents of ``source``: strings, or lists of token ids for a pre-tokenised dataset.

    ``source`` may also be a list of ``Path``s (one file, one document).

    ``column`` picks the dataset column (default: the first of tokens/input_ids/text/content);
    ``split``, ``streaming`` and ``load_kwargs`` go to ``datasets.load_dataset`` when ``source``
    is a dataset name; ``pattern`` selects files when ``source`` is a folder (one file is one
    document, read in sorted path order).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            for file in _text_files(path, pattern):
                yield file.read_text(encoding="utf-8", errors="replace")
            return
        if path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")
            return
        if isinstance(source, Path) or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"source {str(source)!r} is neither a file nor a folder")
        import datasets  # the [lm] extra; only needed for hub datasets

        rows = datasets.load_dataset(source, split=split, streaming=streaming, **load_kwargs)
        yield from _iter_rows(rows, column)
        return
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        yield from source
        return
    if isinstance(source, Sequence) and all(isinstance(s, Path) for s in source):
        for file in source:  # a list of files: one document each
            yield file.read_text(encoding="utf-8", errors="replace")
        return
    if isinstance(source, Iterable):
        yield from _iter_rows(source, column)
        return
    raise TypeError(f"source must be text, a path, a dataset or a dataset name, got {type(source).__name__}")


def bos_settings(model: Any) -> tuple[bool, int | None, int | None]:
    """``(prepend_bos, bos_token_id, separator_token_id)`` that ``model`` expects.

    ``prepend_bos`` follows TransformerLens's ``cfg.default_prepend_bos`` (True when absent);
    the separator between documents is the tokenizer's EOS, else its BOS.
    """
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prepend = bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))
    return prepend and bos is not None, bos, eos if eos is not None else bos


def _encode(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: BOS and separators are placed here, once, not per document.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def iter_contexts(
    documents: Iterable[str | Sequence[int]],
    tokenizer: Any = None,
    context_size: int = DEFAULT_CONTEXT_SIZE,
    *,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    separator_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Pack ``documents`` into ``[context_size]`` int64 contexts (see the module docstring).

    ``tokenizer`` (an HF tokenizer) is needed for string documents; BOS and separator ids
    default to the tokenizer's BOS and EOS. A final window shorter than a context is dropped.
    """
    if not isinstance(context_size, int) or context_size < 2:
        raise ValueError(f"context_size must be an integer >= 2, got {context_size!r}")
    if bos_token_id is None and tokenizer is not None:
        bos_token_id = tokenizer.bos_token_id
    if separator_token_id is None and tokenizer is not None:
        separator_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_token_id
    if prepend_bos and bos_token_id is None:
        raise ValueError("prepend_bos=True needs a BOS token: pass bos_token_id or a tokenizer that has one")
    body = context_size - 1 if prepend_bos else context_size
    stream: list[int] = []
    for doc in documents:
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError("string documents need a tokenizer: pass tokenizer=... (or pre-tokenised ids)")
            stream.extend(_encode(tokenizer, doc))
        else:
            stream.extend(int(t) for t in doc)
        if separator_token_id is not None:
            stream.append(separator_token_id)
        n_full = len(stream) // body
        for i in range(n_full):
            window = stream[i * body : (i + 1) * body]
            yield torch.tensor([bos_token_id, *window] if prepend_bos else window, dtype=torch.long)
        del stream[: n_full * body]


def batched(contexts: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Group ``[context_size]`` contexts into ``[batch, context_size]`` (the last may be short)."""
    check_int("batch_size", batch_size)
    group: list[Tensor] = []
    for context in contexts:
        group.append(context)
        if len(group) == batch_size:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)


def load_tokens(
    source: Any,
    tokenizer: Any = None,
    n_contexts: int | None = None,
    context_size: int = DEFAULT_CONTEXT_SIZE,
    *,
    model: Any = None,
    prepend_bos: bool | None = None,
    bos_token_id: int | None = None,
    separator_token_id: int | None = None,
    **source_kwargs: Any,
) -> Tensor:
    """``[n_contexts, context_size]`` token ids from ``source`` (all of it when ``n_contexts`` is None).

    With ``model`` given, its tokenizer and BOS convention are used unless overridden. This
    is how a fixed, reproducible eval set is made: same source and arguments, same tokens.
    """
    if model is not None:
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model_bos, model_bos_id, model_sep = bos_settings(model)
        prepend_bos = model_bos if prepend_bos is None else prepend_bos
        bos_token_id = model_bos_id if bos_token_id is None else bos_token_id
        separator_token_id = model_sep if separator_token_id is None else separator_token_id
    contexts = iter_contexts(
        iter_documents(source, **source_kwargs),
        tokenizer,
        context_size,
        prepend_bos=True if prepend_bos is None else prepend_bos,
        bos_token_id=bos_token_id,
        separator_token_id=separator_token_id,
    )
    out = []
    for context in contexts:
        if n_contexts is not None and len(out) == n_contexts:
            break
        out.append(context)
    if not out:
        raise ValueError(f"source gave no complete context of {context_size} tokens")
    if n_contexts is not None and len(out) < n_contexts:
        raise ValueError(f"source gave only {len(out)} contexts of {context_size} tokens, {n_contexts} were asked for")
    return torch.stack(out)
