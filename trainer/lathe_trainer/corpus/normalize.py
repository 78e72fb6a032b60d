"""Text normalization, the step after reading.

Only Unicode form, line endings and whitespace change. Letters, digits and punctuation stay as
they are, so domain codes (`E11.9`), doses (`5 mg/kg`) and every other number reach the shards
unchanged. Mapping digits to a placeholder would also make two notes that differ only in their
codes or lab values look identical to deduplication.
"""

from __future__ import annotations

import re
import unicodedata

# Whitespace other than `\n`, the only line break left after _LINE_BREAK: space, tab and the
# Unicode space separators, such as U+00A0 (no-break space) and U+3000.
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LINE_BREAK = re.compile(r"\r\n|[\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def normalize_text(text: str, unicode_form: str = "NFC", collapse_whitespace: bool = True) -> str:
    """Return text in the Unicode form, with `\\n` line breaks and, if asked, collapsed spaces.

    Collapsing turns each run of horizontal whitespace into one space, strips the ends of every
    line and keeps at most one blank line between paragraphs. Leading and trailing whitespace
    of the document is always removed.
    """
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = _LINE_BREAK.sub("\n", text)
    if collapse_whitespace:
        lines = (_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", "\n".join(lines))
    return text.strip()


def word_count(text: str) -> int:
    """Count whitespace-separated words, the unit of `minWords`."""
    return len(text.split())
