"""Rewrite a follow-up question ("what are its risks?") into a stand-alone one using the last turn."""

from __future__ import annotations

import re

_LEADING = re.compile(
    r"^(?:(?:so|ok|okay|and|but|hey|hi)\s*,?\s+)*"
    r"(?:(?:can|could) you\s+)?(?:please\s+)?"
    r"(?:tell me (?:about|what)|explain(?: to me)?|describe|define|what(?:'s| is| are| was| were)"
    r"|whats|who(?:'s| is| are)|how (?:does|do|did|is|are|can|would)|why (?:is|are|does|do)"
    r"|what does|what do|is|are|does|do)\s+",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:an?|the)\s+", re.IGNORECASE)
_TRAILING = re.compile(
    r"\s+(?:work|works|mean|means|do|does|exactly|actually|in defi|in crypto|for beginners)$", re.IGNORECASE
)
_PRONOUN = re.compile(r"\b(its|it's|it|they|them|their|theirs|this|that|these|those)\b", re.IGNORECASE)
_WHAT_ABOUT = re.compile(r"^(?:and\s+)?(?:what|how) about\s+(.+?)[?.!]*$", re.IGNORECASE)
_MAX_TOPIC_WORDS = 6


def extract_topic(question: str) -> str | None:
    """The subject of a simple question ("what is Aave?" -> "Aave"), or None if it is not simple."""
    text = question.strip().rstrip("?.! ")
    previous = None
    while previous != text:
        previous = text
        text = _LEADING.sub("", text, count=1)
    text = _ARTICLE.sub("", text)
    text = _TRAILING.sub("", text).strip(" ,")
    if not text or len(text.split()) > _MAX_TOPIC_WORDS:
        return None
    return text


def looks_like_follow_up(question: str) -> bool:
    """Whether `question` leans on the previous turn (a pronoun, or "what about ..."): it may be rewritten."""
    return bool(_PRONOUN.search(question) or _WHAT_ABOUT.match(question.strip()))


def _possessive(topic: str) -> str:
    return f"{topic}'" if topic.endswith("s") else f"{topic}'s"


def resolve_follow_up(question: str, previous_question: str | None) -> str:
    """Return `question` made stand-alone with the previous question's topic, or unchanged."""
    if not previous_question:
        return question
    topic = extract_topic(previous_question)
    about = _WHAT_ABOUT.match(question.strip())
    if about is not None:
        new_topic = about.group(1)
        if topic and topic.lower() in previous_question.lower():
            pattern = re.compile(re.escape(topic), re.IGNORECASE)
            return pattern.sub(lambda _: new_topic, previous_question, count=1)
        return f"{previous_question} {new_topic}"
    if _PRONOUN.search(question):
        if topic is None:
            return f"{previous_question.rstrip('?.! ')}. {question}"

        def substitute(match: re.Match[str]) -> str:
            word = match.group(1).lower()
            return _possessive(topic) if word in {"its", "their", "theirs"} else topic

        return _PRONOUN.sub(substitute, question)
    return question
