"""Preference data: TRL's formats in, tokenised pairs and padded batches out.

Rows (TRL's preference formats):
  standard, explicit prompt:        {"prompt": str, "chosen": str, "rejected": str}
  standard, implicit prompt:        {"chosen": str, "rejected": str}   (prompt = shared prefix)
  conversational, explicit prompt:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  conversational, implicit prompt:  {"chosen": [messages], "rejected": [messages]} (prompt = shared
                                    leading messages)
  optional: "chosen_token_weights" / "rejected_token_weights": one float per response token (as
  tokenised, EOS included), used as a fixed per-token mask by the losses.
Conversational rows go through the tokenizer's chat template (prompt with the generation prompt;
responses are the assistant turns' text). A BOS is added to plain-text prompts by the tokenizer's
own special-token rule; an EOS ends every response. Truncation follows the official code: if the
prompt plus the longer response exceeds ``max_length``, keep the last ``max_prompt_length``
prompt tokens, then cut both responses to ``max_length - len(prompt)``.

Bad rows are counted and reported by index and reason, and skipped (or raise, ``strict=True``):
missing or mistyped fields, empty prompts or responses, malformed messages, text that is not valid
Unicode, a .jsonl line that is not UTF-8 or not JSON, a JSON object that repeats a key,
non-finite token weights, and anything the tokenizer or its chat template rejects.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

#: The label of prompt and padding positions: no loss is computed there.
IGNORE_INDEX = -100


class ResponsePositions(NamedTuple):
    """Where a batch's response tokens are, after the shift (position t predicts token t+1).

    response [R, T-1] bool; seq_ids, pos [N] int64: the row and position of each response token,
    row-major (tokens grouped by row, in order); labels [N]: the token predicted there.
    """

    response: torch.Tensor
    seq_ids: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor


def response_positions(labels: torch.Tensor) -> ResponsePositions:
    """The response positions of ``labels`` [R, T] (``IGNORE_INDEX`` outside the responses)."""
    target = labels[:, 1:]
    response = target != IGNORE_INDEX
    seq_ids, pos = response.nonzero(as_tuple=True)
    return ResponsePositions(response, seq_ids, pos, target[seq_ids, pos])


@dataclass
class PreferenceExample:
    """One tokenised pair: prompt ids, and the chosen/rejected response ids (EOS included)."""

    index: int
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    chosen_weights: Optional[List[float]] = None
    rejected_weights: Optional[List[float]] = None


@dataclass
class DataReport:
    """What happened to the rows: kept count and (row index, reason) for every dropped row."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: List[Tuple[int, str]] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"{self.kept}/{self.total} rows kept, {len(self.dropped)} dropped, {self.truncated} truncated"]
        lines += [f"  row {i}: {why}" for i, why in self.dropped[:limit]]
        if len(self.dropped) > limit:
            lines.append(f"  ... and {len(self.dropped) - limit} more")
        return "\n".join(lines)


class BadRow(ValueError):
    """A row that cannot be used; the message names the row and the field."""


@dataclass(frozen=True)
class UnreadableRow:
    """A .jsonl line that could not be read as a row (kept in place so row indices stay line order)."""

    reason: str


#: The fields of a row that training reads; a key repeated elsewhere (a metadata object) is harmless.
ROW_FIELDS = ("prompt", "chosen", "rejected", "chosen_token_weights", "rejected_token_weights")


class _KeysRepeated(dict):
    """A JSON object that named some keys (``repeated``) more than once: ``json`` keeps the last
    value silently, so a row with two "chosen" would train on one of them unnoticed."""

    repeated: List[str]


def _json_object(pairs) -> dict:
    """``object_pairs_hook`` for the row readers: a plain dict, or a :class:`_KeysRepeated`."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set = set()
    marked = _KeysRepeated(obj)
    marked.repeated = list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return marked


def _repeated_key(row) -> Optional[str]:
    """Why ``row`` is unusable if it repeats one of :data:`ROW_FIELDS`, or an object inside one of
    those repeats any key, else None."""
    if not isinstance(row, dict):
        return None
    used = [k for k in getattr(row, "repeated", ()) if k in ROW_FIELDS]
    if used:
        return f"key {used[0]!r} appears more than once"
    stack = [row[k] for k in ROW_FIELDS if k in row]
    while stack:  # iterative: a field may nest as deep as json allows
        value = stack.pop()
        if isinstance(value, _KeysRepeated):
            return f"key {value.repeated[0]!r} appears more than once"
        stack.extend(value.values() if isinstance(value, dict) else value if isinstance(value, list) else ())
    return None


def read_rows(source, *, bad_lines: str = "raise") -> List[Any]:
    """Rows from a .jsonl/.json/.parquet file, a ``datasets`` dataset or any iterable of dicts.

    A .jsonl line that is not UTF-8 or not JSON, or a .jsonl/.json row with an object that repeats a
    key, raises naming the file and line or row (``bad_lines="raise"``) or becomes an
    :class:`UnreadableRow` in its place (``"row"``), which :func:`tokenize_dataset` reports as a bad
    row. Items of an iterable that are not mappings are kept as they are, for the same report.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preference data file not found: {path}")
        if path.endswith(".jsonl"):
            rows = []
            with open(path, "rb") as f:
                # bytes.splitlines ends lines at \n, \r\n and a lone \r (old Mac files), as text mode
                # does; iterating the file alone would read a CR-only file as one unreadable line.
                for n, raw in enumerate((line for chunk in f for line in chunk.splitlines()), 1):
                    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
                        raw = raw[3:]
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw.decode("utf-8"), object_pairs_hook=_json_object)
                        why = _repeated_key(row)
                        if why is None:
                            rows.append(row)
                            continue
                    except UnicodeDecodeError as exc:
                        why = f"not UTF-8 (byte {exc.start})"
                    except (json.JSONDecodeError, RecursionError) as exc:
                        why = f"not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})"
                    except ValueError as exc:  # e.g. an integer of more digits than Python converts
                        why = f"not readable JSON ({str(exc).splitlines()[0][:120]})"
                    if bad_lines == "raise":
                        raise ValueError(f"{path}:{n}: {why}")
                    rows.append(UnreadableRow(f"line {n}: {why}"))
            return rows
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not data
                    data = json.load(f, object_pairs_hook=_json_object)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 (byte {exc.start})") from None
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"{path}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise ValueError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:120]})") from None
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            for i, row in enumerate(data):
                why = _repeated_key(row)
                if why is not None:
                    if bad_lines == "raise":
                        raise ValueError(f"{path}: row {i}: {why}")
                    data[i] = UnreadableRow(why)
            return data
        if path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as exc:  # pyarrow's errors: not parquet, truncated
                raise ValueError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:  # a row could not say which of the columns is the field (pyarrow lists the schema)
                raise ValueError(f"{path}: columns {repeated} appear more than once")
            return pq.read_table(path).to_pylist()
        raise ValueError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    # dict() of a string or None raises with no row index, and of a list of pairs makes up a row:
    # anything not a mapping stays as it is, for split_row to report by index like a file's rows.
    return [dict(r) if isinstance(r, Mapping) else r for r in source]


def _is_messages(x) -> bool:
    """Whether ``x`` looks like a message list (a list of dicts with role and content); the
    messages themselves are checked by :func:`_check_messages`."""
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _check_text(field_name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"{field_name!r} is not valid Unicode (a lone surrogate)") from None


def _check_messages(field_name: str, messages) -> None:
    for j, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRow(f"{field_name!r} message {j}: 'role' must be a non-empty string, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise BadRow(
                f"{field_name!r} message {j}: 'content' must be a string, got {type(m.get('content')).__name__}"
            )
        _check_text(f"{field_name} message {j}", m["content"])


def _shared_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_row(row: Dict[str, Any]) -> Tuple[Any, Any, Any, bool]:
    """(prompt, chosen, rejected, conversational) of one row, with an implicit prompt extracted.

    Raises BadRow naming the field for missing or mistyped fields.
    """
    if isinstance(row, UnreadableRow):
        raise BadRow(row.reason)
    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise BadRow(f"missing field {key!r}")
        if row[key] == [] or row[key] == "":
            raise BadRow(f"empty {key!r} response")
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = _is_messages(chosen)
    if conversational != _is_messages(rejected):
        raise BadRow("'chosen' and 'rejected' must both be strings or both be non-empty message lists")
    if not conversational and not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise BadRow(
            f"'chosen'/'rejected' must be strings or message lists, got {type(chosen).__name__}/"
            f"{type(rejected).__name__}"
        )
    for name, value in (("chosen", chosen), ("rejected", rejected), ("prompt", row.get("prompt"))):
        if isinstance(value, str):
            _check_text(name, value)
        elif conversational and isinstance(value, list):
            _check_messages(name, value)
    if "prompt" in row and row["prompt"] is None:  # null, not absent: a broken row, not an implicit prompt
        raise BadRow("'prompt' is null (leave the field out for an implicit prompt)")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: the shared beginning
        n = _shared_prefix(chosen, rejected)
        if conversational:
            while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends before an answer
                n -= 1
        elif n < min(len(chosen), len(rejected)) and not (chosen[n].isspace() and rejected[n].isspace()):
            # a text prompt ends before the word the responses differ in ("was gr" + "eat" would train on
            # tokens real text never has), that word's whitespace going with the responses (TRL moves
            # one space so, but cuts mid-word); text without whitespace (CJK) is cut where it differs
            n = max((i for i in range(n) if chosen[i].isspace()), default=n)
            while n > 0 and chosen[n - 1].isspace():  # the whole run of whitespace ("\r\n")
                n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise BadRow("no 'prompt' field and chosen/rejected share no prompt")
    elif conversational and not _is_messages(prompt):
        raise BadRow("'prompt' must be a non-empty message list when the responses are messages")
    elif not conversational and not isinstance(prompt, str):
        raise BadRow(f"'prompt' must be a string, got {type(prompt).__name__}")
    # implicit or explicit, a blank prompt is the same row: one rule, one message
    if not conversational and not prompt.strip():
        implicit = "" if "prompt" in row else " (no 'prompt' field and chosen/rejected share only whitespace)"
        raise BadRow(f"empty 'prompt'{implicit}: the first response token would be predicted from nothing")
    return prompt, chosen, rejected, conversational


def _response_text(resp, conversational: bool, field_name: str) -> str:
    if not conversational:
        return resp
    if not resp or any(m["role"] != "assistant" for m in resp):
        raise BadRow(f"{field_name!r} must be assistant message(s) after the prompt")
    return "".join(m["content"] for m in resp)


def text_prompt_ids(tokenizer, text: str) -> List[int]:
    """The ids of a text prompt: the tokenizer's own special tokens before it (a BOS where it adds
    one), but not an EOS it appends after every text (Llama-2's ``add_eos_token``, a ``$A </s>``
    post-processor): the response would follow an end of sequence."""
    ids = tokenizer(text).input_ids
    eos = tokenizer.eos_token_id
    # not a lone token: OPT's BOS is its EOS, and for a text of no tokens it is all the prompt has
    if len(ids) > 1 and ids[-1] == eos and tokenizer(text, add_special_tokens=False).input_ids[-1:] != [eos]:
        ids = ids[:-1]
    return ids


def special_token_pattern(tokenizer) -> Optional[re.Pattern]:
    """A regular expression matching the text of any of ``tokenizer``'s special tokens (longest
    first), or None when it has none."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


class PreferenceTokenizer:
    """Turns rows into :class:`PreferenceExample` with TRL's BOS/EOS conventions and our truncation rules (docs/training.md)."""

    def __init__(self, tokenizer, max_length: int = 512, max_prompt_length: int = 256):
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(f"need 1 <= max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.special = special_token_pattern(tokenizer)

    def check_special_text(self, field_name: str, text: str, *, final_eos: bool) -> None:
        """Raise :class:`BadRow` when ``text`` (user text) holds a special token's text, which the
        tokenizer reads as that token: a response would end early and train on what follows, a
        message would spoof the chat template's turns. ``final_eos``: an EOS written at the very end
        is the response's own end, as the package would add it."""
        if self.special is None:
            return
        eos = self.tok.eos_token
        body = text[: -len(eos)] if final_eos and eos and text.endswith(eos) else text
        found = self.special.search(body)
        if found:
            raise BadRow(
                f"{field_name} holds the special token {found.group()!r} as text (at character {found.start()}), "
                "which the tokenizer would read as that token"
            )

    def prompt_ids(self, prompt, conversational: bool) -> List[int]:
        if conversational:
            if getattr(self.tok, "chat_template", None) is None:
                raise BadRow("conversational row but the tokenizer has no chat template")
            text = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False).input_ids
        return text_prompt_ids(self.tok, prompt)

    def response_ids(self, text: str) -> List[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        if not ids or ids[-1] != self.tok.eos_token_id:
            ids = ids + [self.tok.eos_token_id]
        return ids

    def __call__(self, index: int, row: Dict[str, Any]) -> Tuple[PreferenceExample, bool]:
        prompt, chosen, rejected, conv = split_row(row)
        texts = {}
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            text = _response_text(resp, conv, name)
            if not text.strip():
                raise BadRow(f"empty {name!r} response")
            self.check_special_text(repr(name), text, final_eos=True)
            texts[name] = text
        if conv:  # a text prompt may hold them: data with the chat template already applied
            for i, message in enumerate(prompt):
                self.check_special_text(f"'prompt' message {i}", message["content"], final_eos=False)
        if texts["chosen"] == texts["rejected"]:
            raise BadRow("'chosen' and 'rejected' are identical")
        try:
            p = self.prompt_ids(prompt, conv)
            c, r = self.response_ids(texts["chosen"]), self.response_ids(texts["rejected"])
        except BadRow:
            raise
        except Exception as exc:  # the tokenizer or its chat template rejected this row's text
            raise BadRow(f"could not be tokenised ({type(exc).__name__}: {exc})") from None
        if not p:
            raise BadRow("the prompt has no tokens: the first response token would be predicted from nothing")
        if c == r:  # texts that differ only in what the tokenizer drops or merges (a written-out EOS)
            raise BadRow("'chosen' and 'rejected' have the same tokens")
        weights = {}
        for name, ids in (("chosen", c), ("rejected", r)):
            w = row.get(f"{name}_token_weights")
            if w is not None:
                if not isinstance(w, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in w
                ):
                    raise BadRow(f"'{name}_token_weights' must be a list of numbers")
                try:
                    finite = all(math.isfinite(x) for x in w)
                except OverflowError:  # an integer too large for a float
                    finite = False
                if not finite:
                    raise BadRow(f"'{name}_token_weights' holds a non-finite or too large value (NaN, inf, 1e400)")
                if len(w) != len(ids):
                    raise BadRow(
                        f"'{name}_token_weights' has {len(w)} entries but the response has "
                        f"{len(ids)} tokens (EOS included)"
                    )
            weights[name] = None if w is None else [float(x) for x in w]
        truncated = False
        if len(p) + max(len(c), len(r)) > self.max_length:
            truncated = True
            p = p[-self.max_prompt_length :]
            keep = self.max_length - len(p)
            if keep <= 0:
                raise BadRow("nothing of the responses is left after truncation")
            c, r = c[:keep], r[:keep]
            if c == r:  # they differed only in the part truncation cut: nothing left to prefer
                raise BadRow(f"'chosen' and 'rejected' are identical after truncation to max_length {self.max_length}")
            weights = {k: None if v is None else v[:keep] for k, v in weights.items()}
        return PreferenceExample(index, p, c, r, weights["chosen"], weights["rejected"]), truncated


def tokenize_dataset(
    source, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256, strict: bool = False
) -> Tuple[List[PreferenceExample], DataReport]:
    """Read and tokenise every row; bad rows are reported (and skipped, or raise with ``strict``)."""
    rows = read_rows(source, bad_lines="raise" if strict else "row")
    make = PreferenceTokenizer(tokenizer, max_length, max_prompt_length)
    report = DataReport(total=len(rows))
    examples = []
    for i, row in enumerate(rows):
        try:
            ex, truncated = make(i, row)
        except BadRow as exc:
            if strict:
                raise BadRow(f"row {i}: {exc}") from None
            report.dropped.append((i, str(exc)))
            continue
        report.truncated += truncated
        examples.append(ex)
    report.kept = len(examples)
    if not examples:
        where = f" in {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else ""
        raise ValueError(f"no usable preference rows{where}:\n" + report.summary())
    return examples, report


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked
    out of every loss, so which id fills it does not matter as long as it is a valid one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PreferenceCollator:
    """Pads a list of :class:`PreferenceExample` into the batch ``compute_loss`` takes.

    Rows: the B chosen sequences, then the B rejected ones; right padding with ``pad_token_id``;
    labels -100 on prompt and padding; ``token_weights`` (1 where not given) if any example has
    weights.
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: Sequence[PreferenceExample]) -> Dict[str, torch.Tensor]:
        seqs = [(e.prompt_ids, e.chosen_ids, e.chosen_weights) for e in examples] + [
            (e.prompt_ids, e.rejected_ids, e.rejected_weights) for e in examples
        ]
        t = max(len(p) + len(a) for p, a, _ in seqs)
        ids = torch.full((len(seqs), t), self.pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        any_w = any(w is not None for _, _, w in seqs)
        weights = torch.zeros(len(seqs), t) if any_w else None
        for i, (p, a, w) in enumerate(seqs):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            att[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(a)
            if any_w:
                weights[i, len(p) : n] = torch.tensor(w) if w is not None else 1.0
        batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
        if any_w:
            batch["token_weights"] = weights
        return batch
