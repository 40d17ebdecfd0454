"""Run card round trip and the mismatch messages serving relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.errors import UsageError
from ragtune.runcard import RunCardMismatch, check_compatible, read_runcard, update_runcard, write_runcard


def test_roundtrip_and_update(tmp_path: Path) -> None:
    write_runcard(tmp_path, {"base_model": {"path": "/m", "hash": "a" * 64}})
    card = read_runcard(tmp_path)
    assert card["schema_version"] == 1 and card["base_model"]["hash"] == "a" * 64
    update_runcard(tmp_path, exports=[{"type": "merged"}])
    assert read_runcard(tmp_path)["exports"] == [{"type": "merged"}]


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no ragtune.json"):
        read_runcard(tmp_path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    (tmp_path / "ragtune.json").write_text('{"schema_version": 99}')
    with pytest.raises(UsageError, match="newer than this ragtune understands"):
        read_runcard(tmp_path)


def test_base_mismatch_says_which() -> None:
    card = {"base_model": {"path": "/models/a", "hash": "a" * 64}, "chat_template": {"hash": "t" * 64}}
    check_compatible(card, "a" * 64, "/elsewhere/a", "t" * 64)  # same content, other path: fine
    with pytest.raises(RunCardMismatch, match="trained on base model '/models/a'"):
        check_compatible(card, "b" * 64, "/models/b")
    with pytest.raises(RunCardMismatch, match="chat template"):
        check_compatible(card, "a" * 64, "/models/a", "u" * 64)


@pytest.mark.parametrize("card,said", [("[]", "got list"), ('{"base_model": "/m"}', 'got base_model "/m"'),
                                       ('{"base_model": {"path": "/m"}}', "got base_model"), ("{oops", "not valid JSON")])
def test_a_damaged_card_is_said_not_tracebacked(tmp_path: Path, card: str, said: str) -> None:
    (tmp_path / "ragtune.json").write_text(card)
    with pytest.raises(UsageError, match="the run card is damaged|not valid JSON") as err:
        read_runcard(tmp_path)
    assert said in str(err.value)
