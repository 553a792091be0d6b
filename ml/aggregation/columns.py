"""Columnar CSV reading and writing for ``tessera aggregate`` (pyarrow).

Reading: :func:`read_string_columns` parses a CSV with pyarrow's multithreaded reader into string
columns (no type inference), :func:`factorize` numbers the distinct values of a column in order of
first appearance after stripping whitespace as ``str.strip`` does, and :func:`line_of_row` finds
the file line of a data row for error messages (a Python ``csv`` scan that stops at that row, run
only when something is wrong). The callers keep the row-by-row ``csv`` reader as the fallback for
whatever pyarrow will not parse the way ``csv`` does (rows longer or shorter than the header,
lines of blanks, invalid UTF-8), so messages and results stay those of ``csv``.

Writing: :func:`format_g6` formats floats exactly as ``f"{x:.6g}"`` with numpy and pyarrow
kernels, and :func:`csv_text` joins columns into CSV lines (``csv.writer``'s minimal quoting and
``\\r\\n`` line ends), so a million-row result is written without a Python loop per row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# What ``str.strip()`` removes (every code point with ``str.isspace()``); pyarrow's own
# whitespace trimming leaves out \x1c-\x1f.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def read_header(path: Path) -> tuple[list[str], int]:
    """The header's names (stripped, lower case; ``[]`` for an empty file) and its line count."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        return header, reader.line_num


def read_string_columns(
    path: Path, n_columns: int, indices: list[int]
) -> list[pa.ChunkedArray] | None:
    """The data rows' values at ``indices`` as string columns (unstripped); None where pyarrow
    cannot read the file as ``csv`` would (the caller then reads it row by row).

    Empty lines are skipped, as ``csv`` readers here skip them. Quoting is ``csv``'s default
    dialect (``"`` doubled inside quotes, newlines allowed in quoted values).
    """
    names = [f"c{k}" for k in range(n_columns)]
    keep = [names[k] for k in indices]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=keep,
                column_types=dict.fromkeys(keep, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        return None
    return [table[k] for k in keep]


def line_of_row(path: Path, row: int) -> int:
    """The line (1-based, as ``csv.reader.line_num``) of data row ``row`` (0-based, empty lines
    not counted, as :func:`read_string_columns` numbers them)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        k = -1
        for values in reader:
            if values:
                k += 1
                if k == row:
                    return reader.line_num
    raise IndexError(f"{path} has no data row {row}")


def strip(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Values without leading and trailing whitespace (``str.strip``)."""
    return pc.utf8_trim(column, characters=WHITESPACE)


@dataclass(frozen=True)
class Factorized:
    """A column as codes into its distinct (stripped) values in order of first appearance.

    Shape:
        codes: ``(n_rows,)`` int32; names: ``(n_distinct,)`` strings.
    """

    codes: npt.NDArray[np.int32]
    names: pa.Array

    def code_of(self, value: str) -> int:
        """The code of ``value``, -1 when it does not occur."""
        return int(pc.index(self.names, value).as_py())


def _encode(column: pa.ChunkedArray) -> tuple[npt.NDArray[np.int32], pa.Array]:
    """Codes and distinct values in order of first appearance (one hash pass)."""
    if len(column) == 0:
        return np.zeros(0, np.int32), pa.array([], column.type)
    chunks = column.dictionary_encode().chunks
    names = chunks[-1].dictionary
    # the chunks of an encoded column share the final dictionary (indices never change once
    # given); should they not, encode the column as one array
    if any(len(c.dictionary) != len(names) for c in chunks):
        one = column.combine_chunks().dictionary_encode()
        chunks, names = [one], one.dictionary
    return np.concatenate([np.asarray(c.indices, dtype=np.int32) for c in chunks]), names


def factorize(column: pa.ChunkedArray) -> Factorized:
    """Number distinct stripped values in order of first appearance (one hash pass over the raw
    column; only the distinct values are stripped, then merged where stripping made them equal).
    """
    codes, names = _encode(column)
    stripped = strip(names)
    if not pc.all(pc.equal(pc.binary_length(stripped), pc.binary_length(names))).as_py():
        # the dictionary is in order of first appearance, so merging its stripped values in
        # their order of first appearance keeps the rows' order
        merged = stripped.dictionary_encode()
        codes = np.asarray(merged.indices, dtype=np.int32)[codes]
        names = merged.dictionary
    return Factorized(codes, names)


def lookup(column: pa.ChunkedArray, table: dict[str, int]) -> npt.NDArray[np.int8]:
    """``table.get(value.strip().lower(), -1)`` per row, for columns of few distinct values such
    as labels: Python runs once per distinct value.

    A column of single characters (``0``/``1``) is read straight from pyarrow's buffers.
    """
    lut = np.full(256, -1, dtype=np.int8)
    for key, value in table.items():
        if len(key) == 1 and key.isascii():
            lut[ord(key)] = value
            lut[ord(key.upper())] = value
    ones = _single_characters(column)
    if ones is not None:
        return lut[ones]
    codes, names = _encode(column)
    lut = np.asarray([table.get(v.strip().lower(), -1) for v in names.to_pylist()], np.int8)
    return lut[codes]


def _single_characters(column: pa.ChunkedArray) -> npt.NDArray[np.uint8] | None:
    """The bytes of a string column whose values are all one byte long (a view of pyarrow's
    buffers where it has one chunk); None otherwise."""
    if column.type != pa.string() or column.null_count:
        return None
    parts = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        if int(offsets[-1] - offsets[0]) != len(chunk):
            return None
        parts.append(np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]])
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def first_true(mask: npt.NDArray[np.bool_]) -> int | None:
    """Index of the first True, None if none."""
    k = int(np.argmax(mask)) if mask.size else 0
    return k if mask.size and mask[k] else None


# -- writing ----------------------------------------------------------------------------------
_EXACT_POW10 = 22  # 10**k is exact in float64 up to k = 22
_POW10 = 10.0 ** np.arange(_EXACT_POW10 + 1)
_LARGE = pa.large_string()


def _s(text: str) -> pa.Scalar:
    return pa.scalar(text, _LARGE)


def _scale_to_6_digits(
    ax: npt.NDArray[np.float64], e: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """``ax * 10**(5 - e)`` in steps by exact powers of ten (an ulp or so of error per step)."""
    k = 5 - e
    step = np.clip(k, -_EXACT_POW10, _EXACT_POW10)
    m = ax * _POW10[np.maximum(step, 0)]
    m /= _POW10[np.maximum(-step, 0)]
    rest = np.flatnonzero(k != step)
    while rest.size:  # beyond 10**22: values below 1e-17 or above 1e27
        k[rest] -= step[rest]
        step_r = np.clip(k[rest], -_EXACT_POW10, _EXACT_POW10)
        m[rest] = m[rest] * _POW10[np.maximum(step_r, 0)] / _POW10[np.maximum(-step_r, 0)]
        step[rest] = step_r
        rest = rest[k[rest] != step_r]
    return m


# format_g6 assembles each value from a row of source characters: six mantissa digits, three
# exponent digits, then constants. A layout (sign, notation, significant digits) picks which
# sources make up the text; the layouts are few, so they are tabulated once.
_DOT, _ZERO, _MINUS, _E, _PLUS = 11, 12, 13, 14, 15
_MANTISSA = (0, 1, 2, 4, 5, 6)  # byte offsets of the six mantissa digits
_EXPONENT = (8, 9, 10)
_WIDTH = 13  # "-1.23457e-100"
_FORMS = 14  # fixed notation for exponents -4..5, then scientific: (e<0, e>0) x (2, 3 digits)


def _layout(neg: int, form: int, nd: int) -> list[int]:
    src = [_MINUS] if neg else []
    digits = list(_MANTISSA[:nd])
    if form < 10:  # fixed, exponent form - 4
        e = form - 4
        if e >= 0:
            src += digits[: e + 1] + ([_DOT] if nd > e + 1 else []) + digits[e + 1 :]
            src += [_ZERO] * max(e + 1 - nd, 0)  # 120000: digits run out before the point
        else:
            src += [_ZERO, _DOT] + [_ZERO] * (-e - 1) + digits
    else:
        sci = form - 10
        src += digits[:1] + ([_DOT, *digits[1:]] if nd > 1 else [])
        src += [_E, _MINUS if sci < 2 else _PLUS, *(_EXPONENT[1:] if sci % 2 == 0 else _EXPONENT)]
    return src


def _layouts() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    index = np.zeros((2 * _FORMS * 6, _WIDTH), dtype=np.int32)
    length = np.zeros(2 * _FORMS * 6, dtype=np.int64)
    for neg in range(2):
        for form in range(_FORMS):
            for nd in range(1, 7):
                src = _layout(neg, form, nd)
                key = (neg * _FORMS + form) * 6 + nd - 1
                index[key, : len(src)] = src
                length[key] = len(src)
    return index, length


_LAYOUT_INDEX, _LAYOUT_LENGTH = _layouts()
# the three ASCII digits of 0..999, and how many trailing zeros each has (3 for 0)
_DIGITS3 = np.frombuffer("".join(f"{k:03d}" for k in range(1000)).encode(), np.uint8).reshape(
    1000, 3
)
_DIGITS3_BYTES = np.zeros((1000, 4), np.uint8)
_DIGITS3_BYTES[:, :3] = _DIGITS3
_DIGITS3_WORD = _DIGITS3_BYTES.view("<u4").reshape(-1)  # the same as 4-byte words
_DOT_WORD = np.frombuffer(b"\0\0\0.", "<u4")[0]
_CONSTANTS_WORD = np.frombuffer(b"0-e+", "<u4")[0]
_ZEROS3 = np.asarray([3 if k == 0 else len(str(k)) - len(str(k).rstrip("0")) for k in range(1000)])


@dataclass(frozen=True)
class Text:
    """One text value per row: ASCII ``chars[i, :length[i]]``.

    Shape:
        chars: ``(n, width)`` uint8; length: ``(n,)`` int64.
    """

    chars: npt.NDArray[np.uint8]
    length: npt.NDArray[np.int64]

    def to_arrow(self) -> pa.Array:
        """As a large-string array (the rows' characters packed, no Python per row)."""
        n, width = self.chars.shape
        data = self.chars[np.arange(width) < self.length[:, None]]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.length, out=offsets[1:])
        return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def join_text(parts: list[Text], separator: str = ",", end: str = "") -> Text:
    """Row by row: ``separator.join(values) + end``."""
    sep, tail = separator.encode(), end.encode()
    n = parts[0].length.shape[0]
    width = sum(p.chars.shape[1] for p in parts) + len(sep) * (len(parts) - 1) + len(tail)
    out = np.zeros((n, width), dtype=np.uint8)
    flat = out.reshape(-1)
    base = np.arange(n, dtype=np.int64) * width
    out[:, : parts[0].chars.shape[1]] = parts[0].chars
    pos = base + parts[0].length  # where each row's next character goes
    for part in parts[1:]:
        pos = _put(flat, pos, sep)
        for j in range(part.chars.shape[1]):
            on = j < part.length
            if on.all():
                flat[pos + j] = part.chars[:, j]
            else:
                flat[(pos + j)[on]] = part.chars[on, j]
        pos = pos + part.length
    pos = _put(flat, pos, tail)
    return Text(out, pos - base)


def _put(
    flat: npt.NDArray[np.uint8], pos: npt.NDArray[np.int64], text: bytes
) -> npt.NDArray[np.int64]:
    for j, c in enumerate(text):
        flat[pos + j] = c
    return pos + len(text)


def int_text(x: npt.ArrayLike) -> Text:
    """``str(int(v))`` for non-negative integers."""
    v = np.asarray(x, dtype=np.int64).reshape(-1)
    if v.size and v.min() < 0:
        raise ValueError("int_text takes non-negative integers")
    width = len(str(int(v.max()))) if v.size else 1
    length = np.ones(v.shape[0], dtype=np.int64)
    for k in range(1, width):
        length += v >= 10**k
    chars = np.zeros((v.shape[0], width), dtype=np.uint8)
    rest = v.copy()
    for j in range(width - 1, -1, -1):  # right-aligned digits, then shifted left
        chars[:, j] = rest % 10 + 48
        rest //= 10
    shift = width - length
    if width > 1:
        cols = np.arange(width)[None, :] + shift[:, None]
        chars = np.take_along_axis(chars, np.minimum(cols, width - 1), axis=1)
    return Text(chars, length)


def choice_text(index: npt.ArrayLike, choices: list[str]) -> Text:
    """``choices[i]`` per row."""
    width = max(1, *(len(c) for c in choices))
    table = np.zeros((len(choices), width), dtype=np.uint8)
    for k, c in enumerate(choices):
        table[k, : len(c)] = np.frombuffer(c.encode(), np.uint8)
    lengths = np.asarray([len(c) for c in choices], dtype=np.int64)
    i = np.asarray(index, dtype=np.intp).reshape(-1)
    return Text(table[i], lengths[i])


def format_g6(x: npt.ArrayLike) -> Text:
    """``f"{v:.6g}"`` for every value.

    Six significant digits come from scaling by exact powers of ten and rounding; values whose
    scaled mantissa lies within 1e-7 of a rounding tie (where float error could round the other
    way), zeros, non-finite and extreme values go through Python's formatting instead.
    """
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    n = v.shape[0]
    ax = np.abs(v)
    ok = np.isfinite(v) & (ax >= 1e-290) & (ax <= 1e290)
    a = np.where(ok, ax, 1.0)
    e = np.floor(np.log10(a)).astype(np.int64)
    m = _scale_to_6_digits(a, e)
    low, high = m < 1e5, m >= 1e6  # log10 off by one next to a power of ten
    e = e - low + high
    m = np.where(low, m * 10.0, np.where(high, m / 10.0, m))
    ok &= np.abs(m - np.floor(m) - 0.5) > 1e-7
    mi = np.rint(m).astype(np.int64)
    carry = mi >= 1_000_000
    mi = np.where(carry, mi // 10, mi)
    e = e + carry
    hi = mi // 1000
    lo = mi - hi * 1000
    nd = 6 - np.where(lo == 0, 3 + _ZEROS3[hi], _ZEROS3[lo])  # significant digits
    sci = (e < -4) | (e >= 6)
    form = np.where(sci, 10 + 2 * (e > 0) + (np.abs(e) >= 100), np.clip(e + 4, 0, 9))
    key = (np.signbit(v) * _FORMS + form) * 6 + nd - 1
    # sources as 4-byte words: digits 0-2, digits 3-5, exponent digits + ".", then "0-e+"
    src = np.empty((n, 4), dtype="<u4")
    src[:, 0] = _DIGITS3_WORD[hi]
    src[:, 1] = _DIGITS3_WORD[lo]
    src[:, 2] = _DIGITS3_WORD[np.abs(e)] | _DOT_WORD
    src[:, 3] = _CONSTANTS_WORD
    # chars[i, j] = src bytes[i, index[key[i], j]], as one flat gather
    flat = _LAYOUT_INDEX[key] if 16 * n < 2**31 else _LAYOUT_INDEX[key].astype(np.int64)
    flat += np.arange(0, 16 * n, 16, dtype=flat.dtype)[:, None]
    chars = src.view(np.uint8).reshape(-1)[flat]  # (n, _WIDTH)
    length = _LAYOUT_LENGTH[key]
    for k in np.flatnonzero(~ok):
        text = f"{float(v[k]):.6g}".encode()
        chars[k] = 0
        chars[k, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        length[k] = len(text)
    return Text(chars, length)


def _needs_quotes(names: pa.Array) -> bool:
    """Whether any value holds a comma, quote or line break (a scan of the raw bytes)."""
    if len(names) == 0:
        return False
    data = np.frombuffer(names.buffers()[2], dtype=np.uint8)
    return bool(np.isin(data, np.frombuffer(b',"\r\n', np.uint8)).any())


def _quote_minimal(text: pa.Array) -> pa.Array:
    """``csv.writer``'s minimal quoting: values holding a comma, quote or line break go in quotes
    with quotes doubled."""
    if not _needs_quotes(text):
        return text
    needs = pc.match_substring_regex(text, '[,"\r\n]')
    quoted = pc.binary_join_element_wise(
        _s('"'), pc.replace_substring(text, '"', '""'), _s('"'), _s("")
    )
    return pc.if_else(needs, quoted, text)


def csv_text(header: list[str], names: pa.Array, rest: list[Text]) -> list[memoryview | bytes]:
    """A header line, then per row a name (quoted where needed, as ``csv.writer`` does) and the
    ``rest`` values, comma-separated, each line ended by ``\\r\\n`` as ``csv.writer`` ends it.

    Returns the pieces to write in order (the rows are one buffer, not one object per row).
    """
    head = (",".join(header) + "\r\n").encode()
    if len(names) == 0:
        return [head]
    tail = join_text(rest, end="\r\n").to_arrow()
    first = _quote_minimal(pc.cast(names, _LARGE))
    lines = pc.binary_join_element_wise(first, tail, _s(",")).cast(_LARGE)
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)
    start, end = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    return [head, memoryview(lines.buffers()[2])[start:end]]
