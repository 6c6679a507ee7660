"""Question validation shared by every entry point (REST, SSE, WebSocket)."""

from __future__ import annotations


class InvalidQuestionError(ValueError):
    """The question cannot be answered as given; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def clean_question(raw: object, max_chars: int) -> str:
    """Strip the question and check it; raise InvalidQuestionError with a precise reason."""
    if not isinstance(raw, str):
        raise InvalidQuestionError("question_not_string", "question must be a string")
    question = raw.strip()
    if not question:
        raise InvalidQuestionError("question_empty", "question must not be empty or whitespace only")
    if len(question) > max_chars:
        raise InvalidQuestionError(
            "question_too_long", f"question is {len(question)} characters long; the limit is {max_chars}"
        )
    if "\x00" in question:
        raise InvalidQuestionError("question_invalid_characters", "question must not contain NUL characters")
    _check_encodable(question)
    return question


def _check_encodable(question: str) -> None:
    """Refuse text that is not valid Unicode: a `str` can hold lone surrogates (JSON's `\\ud800` escape).

    Surrogate code points (U+D800..U+DFFF) are the only ones a Python `str` can hold that UTF-8 cannot
    encode; they would break everything downstream that encodes the text (cache keys, logs, responses).
    """
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidQuestionError(
            "question_invalid_characters",
            f"question is not valid Unicode text: it contains a lone surrogate code point "
            f"(U+{ord(question[error.start]):04X} at character {error.start}), which cannot be encoded as UTF-8",
        ) from None
