"""The one prompt format: numbered sources, merged system turn, follow-up queries."""

from __future__ import annotations

from ragtune.chat import DEFAULT_RAG_SYSTEM, format_sources, last_user_turns, rag_messages


def test_sources_are_numbered_with_title_heading_and_page() -> None:
    text = format_sources([
        {"n": 1, "title": "Remote Work Policy", "heading": "Remote Work Policy > How often", "text": " Up to 3 days. "},
        {"n": 2, "title": "Handbook", "heading": "Travel", "page": 4, "text": "Book economy."},
        {"n": 3, "source": "notes.txt", "text": "x"},
    ])
    assert text == (
        "[1] Remote Work Policy > How often\nUp to 3 days.\n\n"
        "[2] Handbook > Travel (page 4)\nBook economy.\n\n"
        "[3] notes.txt\nx"
    )


def test_rag_messages_merge_into_an_existing_system_turn() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    out = rag_messages(msgs, [{"n": 1, "title": "T", "text": "fact"}])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n" + DEFAULT_RAG_SYSTEM)
    assert out[0]["content"].endswith("Sources:\n[1] T\nfact")
    assert msgs[0]["content"] == "Be brief."  # input untouched
    assert rag_messages([{"role": "user", "content": "q"}], [], "Custom.")[0]["content"].startswith("Custom.")


def test_follow_up_query_uses_recent_user_turns() -> None:
    msgs = [{"role": "user", "content": "remote work policy?"}, {"role": "assistant", "content": "3 days"},
            {"role": "user", "content": "and on Tuesdays?"}]
    assert last_user_turns(msgs) == "remote work policy?\nand on Tuesdays?"
    assert last_user_turns(msgs, n=1) == "and on Tuesdays?"
