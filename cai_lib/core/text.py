"""Text a user hands the platform, decoded one way: constitutions, import files, chat templates,
prompt files, run configs and datasets all pass through here.

- UTF-8 only. Bytes that are not UTF-8 are one `CaiError` naming the file and the byte offset of
  the first bad byte, not a `UnicodeDecodeError` traceback.
- A UTF-8 byte order mark (which Windows editors write) is dropped, not read as content.
- JSON lines are split on "\\n" alone (a "\\r" before it is dropped). `str.splitlines` would also
  split on U+2028, U+2029, U+0085 and the other separators JSON allows unescaped inside a
  string, and cut a valid row in two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from cai_lib.core.errors import CaiError

BOM = "\ufeff"


def decode_text(data: bytes, where: str, offset: int = 0) -> str:
    """`data` as text; `offset` is where `data` starts in the file named `where` (for a line of it)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaiError(
            f"{where}: not UTF-8 text (byte {offset + err.start} is 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None
    return text.removeprefix(BOM) if offset == 0 else text


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The decoded text of a local file; a missing file or a directory is one line naming it."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaiError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise CaiError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise CaiError(f"{path}: not readable (permission denied)") from None
    return decode_text(data, str(path))


def text_lines(text: str) -> list[str]:
    """The lines of `text`, split on "\\n" alone (see the module docstring)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def decoded_lines(lines: Iterable[bytes], where: str) -> Iterator[str]:
    """Decode the lines of a file read in binary (each ending in b"\\n" but the last), so that a
    bad byte is named by its offset in the whole file; the newline is dropped."""
    offset = 0
    for raw in lines:
        yield decode_text(raw, where, offset).removesuffix("\n").removesuffix("\r")
        offset += len(raw)
