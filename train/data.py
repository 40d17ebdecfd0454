"""Chat JSONL: check (every problem, with its line number), clean, convert and split.

    ragtune data check train.jsonl [--model DIR] [--max-length 1024] [--json] [--write-clean OUT [--force]]
    ragtune data convert faq.csv --question-col question --answer-col answer [--system TEXT] [--out F] [--force]
    ragtune data split train.jsonl --eval-fraction 0.1 --seed 42 [--out-dir DIR] [--force] [--skip-invalid]

No command replaces a file that is there already unless --force, and none writes over its input.

The format is OpenAI fine-tuning JSONL: one {"messages": [{"role", "content"}, ...]} per line,
roles system/user/assistant; assistant messages may carry "weight": 0 or 1 (0 = not trained).
Structural checks need no model; with a tokenizer and chat template the token checks run too
(answers truncated away by max_length, records whose assistant mask is empty) and the stats
report token counts. Nothing here imports torch.

The parts: `ragtune.train.records` (the format and its structural checks), `ragtune.train.data_files`
(reading files and tables), `ragtune.train.data_check` (check_file, write_clean),
`ragtune.train.data_report` (CheckReport), `ragtune.train.data_convert` (convert) and
`ragtune.train.data_split` (split). Every public name of those can be imported from here.
"""

from __future__ import annotations

from ragtune.train.data_check import check_file, clean_targets, write_clean
from ragtune.train.data_convert import convert
from ragtune.train.data_files import TABLE_SUFFIXES, TOO_DEEP, decode_text, json_hint, read_lines
from ragtune.train.data_report import KINDS, CheckReport, Problem
from ragtune.train.data_split import split, split_items
from ragtune.train.records import (
    FORMATS,
    MESSAGE_KEYS,
    RECORD_KEYS,
    ROLES,
    SHAREGPT_ROLES,
    TOOL_MESSAGE_KEYS,
    TOOL_RECORD_KEYS,
    TOOL_ROLES,
    Record,
    detect_format,
    fold,
    prompt_key,
    record_problems,
    record_prompt,
    shared_system_prompt,
    uses_tools,
)

__all__ = [
    "FORMATS", "KINDS", "MESSAGE_KEYS", "RECORD_KEYS", "ROLES", "SHAREGPT_ROLES", "TABLE_SUFFIXES", "TOOL_MESSAGE_KEYS",
    "TOOL_RECORD_KEYS", "TOOL_ROLES", "TOO_DEEP", "CheckReport", "Problem", "Record", "check_file", "clean_targets",
    "convert", "decode_text", "detect_format", "fold", "json_hint", "prompt_key", "read_lines", "record_problems",
    "record_prompt", "shared_system_prompt", "split", "split_items", "uses_tools", "write_clean",
]
