"""Follow-up questions: what a conversation is about, and how a follow-up inherits it.

Every knowledge-base entry lists its *subjects* (`Entry.subjects`: protocols, tokens, concepts, main one
first). After each answer the session keeps the conversation's subjects (`conversation_subjects`: the
answered entry's main subject, then the subjects the question named). The next question is then:

- `new_topic` ("new question: ...", "unrelated, ..."): asked as it is;
- `pronoun` ("what are its risks?", "can i earn there?", "do i need one?") and `fragment` (a short question
  or an "and ..." ellipsis: "risks?", "and v3?", "how are the rates set?"): also ranked with the subject
  after it ("what are its risks? (Aave)");
- `what_about` ("what about Compound?", "what about in europe?", "the usds one?"): also ranked as the previous
  question with its subject (or the phrase after the same preposition, or the subject's modifier) swapped, and,
  when X is no subject of the knowledge base ("what about the risks?"), as that side of the conversation's subject;
- `standalone` (a longer question with no pronoun): asked as it is.

`plan_follow_up` lists those rewrites (each costs one embedding and one ranking); `choose` keeps the
best-grounded candidate, preferring entries about the conversation's subjects when the scores are close,
unless the question names a subject of its own (a subject change is never inherited). No model is used.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from services.retrieval import Match

Form = Literal["standalone", "new_topic", "pronoun", "what_about", "fragment"]

SUBJECT_BONUS = 0.06
"""How much an entry sharing the conversation's subject may score below another and still be preferred."""
MAX_SUBJECTS = 5
"""Subjects kept per turn."""
SUBJECT_REWRITES = 2
"""Rewrites per follow-up: the main subject, and one the previous question named (one embedding + ranking each)."""
FRAGMENT_MAX_WORDS = 8
"""A question without pronoun up to this long may lean on the conversation (longer ones stand alone)."""

# --- the question's form ------------------------------------------------------------------------------------

_NEW_TOPIC = re.compile(
    r"^\W*(?:(?:ok(?:ay)?|so|also|btw|anyway|hey)\W+)*"
    r"(?:new (?:topic|question|q)|(?:totally |completely )?unrelated(?: question| q)?|different (?:topic|question|q)"
    r"|(?:changing|switching|change) (?:the )?(?:subject|topic|gears)|off[ -]topic|another (?:question|topic))\b",
    re.IGNORECASE,
)
_WHAT_ABOUT = re.compile(
    r"^(?:(?:and|ok(?:ay)?|so|but|also)\s*,?\s+)*(?:what|how) about\s+(.+?)[?.!\s]*$", re.IGNORECASE
)
_LEAD_IN = re.compile(r"^(?:(?:and|also|plus|so|ok(?:ay)?|but|then|what about|how about)\b[\s,]*)+", re.IGNORECASE)
_PERSONAL_PRONOUN = re.compile(r"\b(?:it's|its|itself|it|they|them|their|theirs|themselves)\b", re.IGNORECASE)
# "there" as a place ("can i earn there"), not as in "is there" / "there is".
_THERE = re.compile(
    r"(?<!\bis )(?<!\bare )(?<!\bwas )(?<!\bwere )(?<!\bisn't )(?<!\baren't )(?<!\bisnt )(?<!\barent )"
    r"\bthere\b"
    r"(?!\s+(?:is|are|was|were|isn't|aren't|isnt|arent|be|been|will|any|anything|a|an|some|no|s)\b)(?!')",
    re.IGNORECASE,
)
# "this"/"that" standing for a thing ("is that safe?", "this one"), not "the fees that ...".
_DEMONSTRATIVE_WORD = r"(?:this|that|these|those)(?:\s+(?:one|ones|thing|stuff)\b)?"
_DEMONSTRATIVE_VERB = r"is|are|was|does|do|can|should|how does|how do|why is|why does|what is|whats|what's"
_DEMONSTRATIVE_LEAD = re.compile(rf"^(?:{_DEMONSTRATIVE_VERB})\s+{_DEMONSTRATIVE_WORD}\b", re.IGNORECASE)
_DEMONSTRATIVE_END = re.compile(rf"\b{_DEMONSTRATIVE_WORD}(?=\s*(?:[?.!,]|$))", re.IGNORECASE)
_DEMONSTRATIVE_ONE = re.compile(r"\b(?:this|that|these|those)\s+(?:one|ones|thing|stuff)\b", re.IGNORECASE)
# "this"/"that" as an object ("how can i stop that from happening", "how do i spot this in practice", "what if
# that happens"), not as a conjunction ("so that in ...", "make sure that the ...").
_DEMONSTRATIVE_OBJECT = re.compile(
    r"(?<!\bso )(?<!\bsuch )(?<!\bnow )(?<!\bgiven )(?<!\bexcept )"
    r"\b(?:this|that)\s+(?:in|on|at|for|with|to|from|again|instead|too|happens?|happened|occurs?)\b"
    r"|\b(?:stop|avoid|prevent|fix|undo|reverse|handle|survive|deal with|recover from)\s+(?:this|that)\b"
    r"(?!\s+(?:the|a|an|my|your|his|her|our|it|they|you|i|we|is|are|was|were)\b)",
    re.IGNORECASE,
)
_MINE = re.compile(r"\bmine\b", re.IGNORECASE)
# "one" standing for a thing after a verb ("do i need one?", "can i take one from my wallet").
_ONE_PRONOUN = re.compile(
    r"\b(?:take|get|use|need|buy|open|make|set|run|have|pick|choose|want|find|create|spot|hold|trust|is|be|was)"
    r"\s+one\b"
    r"(?!\s+(?:of|more|day|time|thing|way|another|or|by)\b)",
    re.IGNORECASE,
)
_PREPOSITION = re.compile(r"^(in|on|for|with|from|at|into|onto|over|under|via|using|inside)\s+(.+)$", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_ONE = re.compile(r"\s+(?:one|ones)$", re.IGNORECASE)
_REFERRING = (
    _PERSONAL_PRONOUN,
    _THERE,
    _DEMONSTRATIVE_LEAD,
    _DEMONSTRATIVE_END,
    _DEMONSTRATIVE_ONE,
    _DEMONSTRATIVE_OBJECT,
    _MINE,
    _ONE_PRONOUN,
)


def _referring(text: str) -> bool:
    return any(pattern.search(text) for pattern in _REFERRING)


def classify(question: str) -> Form:
    """How `question` relates to the previous turn (see the module docstring)."""
    text = question.strip()
    if _NEW_TOPIC.match(text):
        return "new_topic"
    referring = _referring(text)
    if (about := _WHAT_ABOUT.match(text)) and not (referring and _referring(about.group(1))):
        return "what_about"  # but "what about its fees?" asks about the conversation's subject
    if referring:
        return "pronoun"
    rest = _LEAD_IN.sub("", text)
    if rest != text or len(rest.split()) <= FRAGMENT_MAX_WORDS:
        return "fragment"
    return "standalone"


# --- subjects in text ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _words(text: str) -> str:
    """Lower case, NFKC, punctuation as spaces: "E-Mode's" -> "e mode s"."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", unicodedata.normalize("NFKC", text).lower()).split())


def _subject_body(subject: str) -> str:
    """Whole words, optional spaces between them ("e-mode" ~ "emode"), optional plural ("flash loans")."""
    body = r"\s?".join(re.escape(word) for word in _words(subject).split())
    return rf"\b{body}(?:s|es)?\b"


@functools.lru_cache(maxsize=1024)
def _subjects_pattern(subjects: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for all `subjects`, longest first, so a longer subject wins where both could match."""
    order = sorted(
        (index for index, subject in enumerate(subjects) if _words(subject)), key=lambda i: -len(subjects[i])
    )
    return re.compile("|".join(f"(?P<s{index}>{_subject_body(subjects[index])})" for index in order) or r"(?!)")


@functools.lru_cache(maxsize=4096)
def _catalogue(subjects: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`subjects` without repeats, each with its letters run together ("E-Mode" -> "emode")."""
    return tuple((subject, _words(subject).replace(" ", "")) for subject in _unique(subjects))


def _named(text: str, *groups: Iterable[str]) -> list[str]:
    """The subjects of `groups` (taken in order, repeats dropped) that `text` names, in the order named; one
    named only inside a longer one is not ("staking" in "liquid staking tokens")."""
    words = _words(text)
    compact = words.replace(" ", "")
    # a cheap filter first (a subject's letters must appear in the text), then one pattern for the few left;
    # each group's words are worked out once (the knowledge base's vocabulary is one group for every entry)
    present = _unique(
        subject for group in groups for subject, letters in _catalogue(tuple(group)) if letters in compact
    )
    if not present:
        return []
    found = (match.lastgroup for match in _subjects_pattern(present).finditer(words))
    return list(_unique(present[int(group[1:])] for group in found if group))


def mentions(text: str, subject: str) -> bool:
    """Whether `text` names `subject` (case, punctuation, spacing and a plural "s" aside)."""
    return bool(_named(text, (subject,)))


def _same(subject: str, other: str) -> bool:
    return _words(subject) == _words(other)


def _unique(subjects: Iterable[str]) -> tuple[str, ...]:
    """The subjects without repeats (the same words) or blanks, in order."""
    kept: dict[str, str] = {}
    for subject in subjects:
        if key := _words(subject):
            kept.setdefault(key, subject)
    return tuple(kept.values())


def shares_subject(match: Match, subjects: Sequence[str]) -> bool:
    """Whether the match's entry is about one of `subjects`."""
    return any(_same(own, subject) for own in match.entry.subjects for subject in subjects)


def named_subjects(text: str, matches: Sequence[Match]) -> tuple[str, ...]:
    """Subjects of the top entry that `text` names, in the order they are named."""
    return tuple(_named(text, matches[0].entry.subjects)) if matches else ()


def conversation_subjects(text: str, matches: Sequence[Match], threshold: float) -> tuple[str, ...]:
    """What a conversation is about once `text` was answered with `matches`, main subject first.

    The answered (top) entry's main subject, then the subjects `text` names (the entry's own, then any other
    subject of the knowledge base: "How does Aave handle liquidations?", answered with the generic
    liquidation entry, is still about Aave), then the entry's other subjects. Nothing when the top entry is
    below `threshold`.
    """
    if not matches or matches[0].score < threshold:
        return ()
    top = matches[0].entry
    named = _named(text, top.subjects, top.vocabulary)
    own = [subject for subject in named if any(_same(subject, mine) for mine in top.subjects)]
    others = [subject for subject in named if subject not in own]
    return _unique([*top.subjects[:1], *own, *others, *top.subjects])[:MAX_SUBJECTS]


def _subject_like(text: str, vocabulary: Sequence[str]) -> bool:
    """Whether `text` names a subject of the knowledge base, or the start of one ("burn and mint" of
    "burn-and-mint bridge"); "the risks" or "fees" name none."""
    words = _words(text)
    return bool(_named(text, vocabulary)) or any(_words(subject).startswith(f"{words} ") for subject in vocabulary)


def _referent_inside(question: str, named: Sequence[str]) -> bool:
    """Whether the question names a subject before its first pronoun ("what is a rug pull and how do I spot
    it?"): the pronoun may then point at it. A pronoun before any subject points back at the conversation."""
    starts = [found.start() for pattern in _REFERRING if (found := pattern.search(question))]
    return bool(starts) and any(mentions(question[: min(starts)], subject) for subject in named)


# --- rewrites -----------------------------------------------------------------------------------------------


def _with_subject(question: str, subject: str) -> str:
    """The question without its lead-in, with the subject after it: "and the fees?" -> "the fees? (Aave)".

    The pronoun is left in place: "what are its risks? (Aave)" ranks as well as "what are Aave's risks?" and
    needs no grammar (which pronoun, which case, "there" or "is there").
    """
    rest = _LEAD_IN.sub("", question.strip()) or question.strip()
    return f"{rest} ({subject})"


def _swap_subject(
    previous: str, subjects: Sequence[str], new: str, modifier: bool = False
) -> tuple[str, str | None] | None:
    """The previous question with its subject replaced by `new`, and the subject replaced.

    "What is Aave?" + "Compound" -> ("What is Compound?", "Aave"). When `new` starts with a preposition
    ("on perps"), a subject after the same preposition is replaced ("how does liquidation work on aave"), or
    else the phrase after the same preposition ("are stablecoins regulated in the us" + "in europe" -> "... in
    europe", no subject replaced). A `modifier` ("the usds one") replaces a subject named inside a longer one
    and keeps the rest ("what is the dai savings rate" -> "what is the usds savings rate").
    """
    preposition = _PREPOSITION.match(new)
    bare = preposition.group(2) if preposition else new
    candidates: list[tuple[int, int, re.Match[str], str]] = []
    for rank, subject in enumerate(subjects):
        words = [re.escape(word) for word in _words(subject).split()]
        if not words:
            continue
        pattern = re.compile(r"\b" + r"[\W_]*".join(words) + r"(?:'?s|es)?\b", re.IGNORECASE)
        for found in pattern.finditer(previous):
            after_same_preposition = preposition is not None and re.search(
                rf"\b{re.escape(preposition.group(1))}\s+(?:the\s+)?$", previous[: found.start()], re.IGNORECASE
            )
            candidates.append((rank - (100 if after_same_preposition else 0), found.start(), found, subject))
    if preposition is not None and not any(rank < 0 for rank, *_ in candidates):
        phrase = re.search(rf"\b{re.escape(preposition.group(1))}\s+(.+?)[?.!\s]*$", previous, re.IGNORECASE)
        if phrase is not None and not _named(phrase.group(1), subjects):
            return previous[: phrase.start()] + new + previous[phrase.end(1) :], None
    if not candidates:
        return None

    _, _, found, subject = min(candidates, key=lambda candidate: candidate[:2])
    start, end = found.span()
    if modifier:  # keep the head noun: a subject named at the start of this one, or else its last word
        nested = [(other.end(), own) for _, _, other, own in candidates if other.start() == start and other.end() < end]
        head = re.search(r"[^\W_]+$", found[0])
        if nested:
            end, subject = max(nested)
        elif head is not None and head.start() > 0:
            end = start + head.start()
            bare += " "
    return previous[:start] + bare + previous[end:], subject


def _what_about_target(question: str) -> tuple[str, bool]:
    """X in "what about X?", without its article or a trailing "one" ("the usds one" -> "usds"), and whether
    there was one (X then only modifies what the previous question asked about)."""
    about = _WHAT_ABOUT.match(question.strip())
    target = _ARTICLE.sub("", (about.group(1) if about else question).strip())
    bare = _ONE.sub("", target).strip()
    return (bare or target.strip()), bool(bare) and bare != target.strip()


@dataclass(frozen=True)
class FollowUp:
    """How a question relates to the conversation: its form, the subjects before it and the rewrites to rank.

    A `what_about` question asks about `target` instead of the subject `replaced` (None: a phrase that is no
    subject was replaced), or, when `target` is no subject ("the risks"), about that side of the conversation's
    subject: the rewrite `aspect`. `previous_entry` is the entry the previous turn answered with.
    """

    form: Form
    subjects: tuple[str, ...]
    rewrites: tuple[str, ...] = ()
    target: str | None = None
    replaced: str | None = None
    previous_entry: str | None = None
    aspect: str | None = None


def _rewrite_subjects(previous_question: str | None, subjects: tuple[str, ...]) -> tuple[str, ...]:
    """The main subject, and a second one only when the previous question named it ("Aave" in "How does Aave
    handle liquidations?"): a subject the question never named would pull the rewrite off topic."""
    named = [subject for subject in subjects[1:] if previous_question and mentions(previous_question, subject)]
    return (subjects[0], *named)[:SUBJECT_REWRITES]


def plan_follow_up(
    question: str, previous_question: str | None, subjects: Sequence[str], previous_entry: str | None = None
) -> FollowUp:
    """The question's form and its rewrites with the conversation's subjects (none for a stand-alone question).

    `previous_entry` is the id of the entry the previous turn answered with.
    """
    form = classify(question)
    subjects = tuple(subjects)
    if not subjects or form in {"new_topic", "standalone"}:
        return FollowUp(form, subjects, previous_entry=previous_entry)
    target: str | None = None
    replaced: str | None = None
    aspect: str | None = None
    if form == "what_about":
        target, modifier = _what_about_target(question)
        swap = _swap_subject(previous_question, subjects, target, modifier) if previous_question else None
        replaced = swap[1] if swap else subjects[0]
        kept = [subject for subject in subjects if replaced is None or not _same(subject, replaced)]
        rewrites = [swap[0] if swap else f"{target} {subjects[0]}"]
        if kept and not (modifier and swap):  # "usds" alone is not what "the usds one" asks about
            rewrites.append(_with_subject(target, kept[0]))
        if not modifier:  # "what about the risks?" may ask about another side of the same subject
            aspect = _with_subject(target, subjects[0])
            rewrites.append(aspect)
    else:
        rewrites = [_with_subject(question, subject) for subject in _rewrite_subjects(previous_question, subjects)]
    unique = [text for text in dict.fromkeys(rewrites) if text.strip() and text != question]
    return FollowUp(form, subjects, tuple(unique), target, replaced, previous_entry, aspect)


# --- choosing among the ranked candidates --------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The text a question was answered as, and its matches (best first)."""

    text: str
    matches: list[Match]


def best_scoring(ranked: Sequence[tuple[str, list[Match]]]) -> Choice:
    """The candidate whose best entry scores higher (the first one on a tie)."""
    best_text, best_matches = "", list[Match]()
    for text, matches in ranked:
        if not best_matches or (matches and matches[0].score > best_matches[0].score):
            best_text, best_matches = text, matches
    return Choice(best_text, best_matches)


def choose(question: str, follow_up: FollowUp, ranked: Sequence[tuple[str, list[Match]]], threshold: float) -> Choice:
    """Keep the best-grounded candidate, preferring entries about the conversation's subjects.

    `ranked` pairs each candidate text with its matches (best first); the question as asked is one of them.
    Each candidate competes with its top entry's score. A *preferred* entry (it clears `threshold`, is not
    the answer just given, and relates to the conversation as below) adds `SUBJECT_BONUS` per relation and
    may also be taken from below the top of its list:

    - pronoun, fragment: an entry about a subject of the conversation. When the question names a subject of
      its own (its best entry's subject appears in it), a fragment only prefers entries about both, and the
      rewrites compete only through those: a new subject is not inherited. A question without a subject of
      its own (or whose pronoun comes before the subject it names) is about the conversation's, so as asked
      it competes only through preferred entries.
      A pronoun before a conversation subject the question names points at another one ("how is it different
      from impermanent loss?"): entries about the named one get no preference.
    - what_about: an entry with the new subject as one of its subjects, and (a second relation) an entry
      about a subject the question keeps but not mainly about the one it moves away from. When the target is no
      subject of the knowledge base, the `aspect` rewrite competes too, preferring entries about the
      conversation's subjects; otherwise it is left out.
    """
    if follow_up.form in {"new_topic", "standalone"} or not follow_up.subjects:
        return best_scoring(ranked)
    asked = next((matches for text, matches in ranked if text == question), [])
    named = named_subjects(question, asked) if follow_up.form in {"fragment", "pronoun"} else ()
    # the question stands on its own subject: a fragment naming one, a pronoun pointing at one it named first
    self_contained = bool(named) and (follow_up.form == "fragment" or _referent_inside(question, named))
    subjects = follow_up.subjects
    if follow_up.form == "what_about" and follow_up.replaced is not None:
        subjects = tuple(subject for subject in subjects if not _same(subject, follow_up.replaced))
    elif named and not self_contained:
        # "how is it different from impermanent loss?": the pronoun points at another of the conversation's subjects
        subjects = tuple(subject for subject in subjects if not any(_same(subject, own) for own in named)) or subjects
    target = _PREPOSITION.sub(r"\2", follow_up.target or "")
    vocabulary = next((match.entry.vocabulary for _, matches in ranked for match in matches), ())
    # "what about the risks?" reads as a side of the conversation's subject; "what about compound?" does not
    aspect = follow_up.aspect if follow_up.aspect and not _subject_like(target, vocabulary) else None
    skipped = {follow_up.aspect} - {aspect} - set(follow_up.rewrites[:-1])

    def relations(match: Match, text: str = "") -> int:
        """How many of the question's relations to the conversation the entry has (0: not preferred)."""
        if match.score < threshold or match.entry.id == follow_up.previous_entry:
            return 0  # a follow-up asks for something new: the answer just given gets no preference
        own = match.entry.subjects
        if aspect is not None and text == aspect:
            return int(shares_subject(match, follow_up.subjects))
        if follow_up.form == "what_about":
            about_target = any(mentions(target, subject) and mentions(subject, target) for subject in own)
            mainly_replaced = bool(own) and _same(own[0], follow_up.replaced or "")
            return about_target + (shares_subject(match, subjects) and not mainly_replaced)
        if follow_up.form == "fragment" and named:
            return int(shares_subject(match, subjects) and shares_subject(match, named))
        return int(shares_subject(match, subjects))

    def competes(text: str, position: int) -> bool:
        """Whether a match that is not preferred may still win (only a candidate's top one may)."""
        if position > 0:
            return False
        if text == question:
            return self_contained or follow_up.form == "what_about"
        return not (named and follow_up.form == "fragment")

    best: tuple[float, str, list[Match], int] | None = None
    for text, matches in ranked:
        if text in skipped:
            continue
        for position, match in enumerate(matches):
            bonus = relations(match, text)
            if bonus or competes(text, position):
                key = match.score + SUBJECT_BONUS * bonus
                if best is None or key > best[0]:
                    best = (key, text, matches, position)
    if best is None:
        return best_scoring(ranked)
    _, text, matches, position = best
    chosen = [matches[position], *matches[:position], *matches[position + 1 :]]
    if text == question and relations(chosen[0], text) and not self_contained:
        # answered about the conversation's subject: the resolved question says so
        own = chosen[0].entry.subjects
        text = next((rewrite for rewrite in follow_up.rewrites if any(mentions(rewrite, s) for s in own)), text)
    return Choice(text, chosen)


# --- the rule-based rewrite used when the conversation's subjects are not known -------------------------------

_LEADING = re.compile(
    r"^(?:(?:so|ok|okay|and|but|hey|hi)\s*,?\s+)*"
    r"(?:(?:can|could) you\s+)?(?:please\s+)?"
    r"(?:tell me (?:about|what)|explain(?: to me)?|describe|define|what(?:'s| is| are| was| were)"
    r"|whats|who(?:'s| is| are)|how (?:does|do|did|is|are|can|would)|why (?:is|are|does|do)"
    r"|what does|what do|is|are|does|do)\s+",
    re.IGNORECASE,
)
_ARTICLE_START = re.compile(r"^(?:an?|the)\s+", re.IGNORECASE)
_TRAILING = re.compile(
    r"\s+(?:work|works|mean|means|do|does|exactly|actually|in defi|in crypto|for beginners)$", re.IGNORECASE
)
_PRONOUN = re.compile(r"\b(its|it's|it|they|them|their|theirs|this|that|these|those)\b", re.IGNORECASE)
_MAX_TOPIC_WORDS = 6


def _possessive(topic: str) -> str:
    return f"{topic}'" if topic.endswith("s") else f"{topic}'s"


def extract_topic(question: str) -> str | None:
    """The subject of a simple question ("what is Aave?" -> "Aave"), or None if it is not simple."""
    text = question.strip().rstrip("?.! ")
    previous = None
    while previous != text:
        previous = text
        text = _LEADING.sub("", text, count=1)
    text = _ARTICLE_START.sub("", text)
    text = _TRAILING.sub("", text).strip(" ,")
    if not text or len(text.split()) > _MAX_TOPIC_WORDS:
        return None
    return text


def looks_like_follow_up(question: str) -> bool:
    """Whether `question` leans on the previous turn (a pronoun, or "what about ..."): it may be rewritten."""
    return bool(_PRONOUN.search(question) or _WHAT_ABOUT.match(question.strip()))


def resolve_follow_up(question: str, previous_question: str | None) -> str:
    """Return `question` made stand-alone with the previous question's topic, or unchanged.

    The fall-back when the conversation's subjects are unknown: it works on the previous question's words.
    """
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
