"""Find names in a question that the knowledge base does not know (made-up protocols, tokens, people).

Asked about "the Plendrix bridge", the ranker would answer with the nearest generic entry as if it knew
Plendrix. `NameVocabulary.unknown_terms` finds such words with small, explainable rules, offline:

- known: every word of the knowledge base's questions, alternatives and answers, a built-in list of generic
  crypto, web and chat vocabulary (`GENERIC_VOCABULARY`), and English words (pyspellchecker's English
  frequency list, MIT, bundled in its wheel; read once per process);
- a misspelling is not a name: one edit (two for words of 9+ letters) from a known word, or one slip from a
  common English word (two letters swapped, a letter missing or too many, a letter replaced by a neighbouring
  key or another vowel), the first letter kept; British spellings of English words count as English;
- what is left is reported when it looks like a name: a capitalised word inside a sentence, a CamelCase
  word, an all-caps ticker, a `$TICKER`, a lower-case word of 4+ letters, or a word just before a noun such
  as "token", "protocol" or "bridge" (which also catches an English word used as a name: "Ember Protocol").

Costs: ~5 µs for a 10-word question of known words; the typo checks run only for the other words (~10-60
µs each, at most `MAX_SLOW_WORDS` per question). Start-up: ~0.2 s and ~29 MB, mostly the English list.
Limits: an English word in lower case ("kwanza swap") or at the start of a sentence is not seen as a name; a
name one letter from a known word ("Aavex") is taken for a typo; a lower-case word of 3 letters is a name
only before "token", "coin"...; real names the knowledge base lacks (people, exchanges, tokens) are reported.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path

# Generic crypto vocabulary, well-known chains with their native tickers, wallets, and web and chat words a
# user may type that the English list lacks. No protocol the knowledge base would know nothing about.
_GENERIC_TEXT = """
    defi cefi tradfi dex dexes cex cexes amm amms apy apr apys aprs tvl dao daos nft nfts l1 l1s l2 l2s l3 evm
    erc erc20 erc721 erc1155 erc4626 eip bip bip39 web3 web2 dapp dapps crypto cryptos cryptocurrency
    cryptocurrencies blockchain blockchains onchain offchain crosschain multichain stablecoin stablecoins
    altcoin altcoins memecoin memecoins shitcoin shitcoins staking stake staked staker stakers unstake unstaking
    restake restaking airdrop airdrops airdropped rugpull rugpulls rugged honeypot honeypots drainer drainers
    gwei wei sats satoshi satoshis hodl hodler hodlers hodling degen degens rekt wagmi ngmi gm gn ser fren frens
    anon anons wen lambo fomo fud ath atl dca roi kyc aml otc p2p mev lp lps lping lst lsts lrt lrts rwa rwas
    mainnet testnet devnet sidechain sidechains rollup rollups zk zkp zkps snark snarks stark starks sharding
    validator validators multisig multisigs timelock timelocks tokenomics onramp offramp depeg depegged
    frontrun frontrunning backrun flashloan flashloans txn txns tx txs txid eoa abi rpc rpcs ens ipfs noob noobs
    diff whitepaper testnets gasless perp perps leverage hashrate keystore dyor nfa moonshot mooning bagholder
    ico icos ido idos ieo tge vc vcs
    bagholders ponzi shill shilling scammer scammers phishing metaverse tokenized tokenised tokenization
    tokenisation composability permissionless permissioned overcollateralized undercollateralized seedphrase
    bitcoin btc ethereum eth ether solana sol polygon matic pol arbitrum optimism avalanche avax bnb bsc
    cardano ada polkadot dot cosmos atom tron trx litecoin ltc dogecoin doge monero xmr ripple xrp ton sui
    aptos near base usd usdc usdt dai wbtc weth steth
    metamask ledger trezor phantom rabby exodus coinbase binance nano lightning merkle
    app apps smartphone wifi pc laptop email emails online website websites login logins signup username
    google youtube twitter reddit discord telegram whatsapp tiktok iphone android ios url urls www http https
    icloud gmail dropbox onedrive gdrive pdfs screenshots github gitlab dm dms
    com org io xyz fi api apis sdk ui ux gui faq pdf ai chatgpt gpt llm vpn 2fa mfa sms otp ip ceo cto cfo
    usa uk eu un sec cftc irs hmrc fca mica fdic etf etfs ipo gdp cpi fed ecb eur gbp jpy cad aud chf inr
    thx pls plz ty tysm btw imo imho tbh idk idc lol lmao omg wtf smh ngl rn afaik iirc tldr eli5 asap fyi
    diy etc eg ie aka vs ok okay u ur ya yall cuz coz bc tho thru nah yep yup gonna wanna gotta kinda sorta
    dunno lemme gimme im ive youre youve youll youd theyre theyve dont doesnt didnt cant wont isnt arent
    wasnt werent shouldnt wouldnt couldnt hasnt havent hadnt mustnt thats whats hows whos wheres whens whys
    theres heres lets itll thatll shes hes weve wouldve shouldve couldve aint alot prolly probly tmrw tommorow
"""

# Nouns that make the word just before them a name: "Plendrix bridge", "QRN tokens", "Ember Protocol".
_NAME_NOUN_TEXT = """
    token tokens coin coins protocol protocols bridge bridges dao daos chain chains network networks exchange
    exchanges dex swap finance wallet wallets vault vaults labs foundation stablecoin stablecoins airdrop
    l2 rollup mainnet testnet capital ventures markets money lending lend staking
"""

# Capitalised inside a sentence only in Title Case: "What Is The Risk Of Using Aave".
_FUNCTION_WORD_TEXT = """
    a an the of to in on at by for from with and or but is are was be do does did how what why when where who
    which can should will would it its my your this that these those not
"""


# English words that, capitalised before such a noun, still describe it: "our Favourite Token".
_NOT_NAMES_TEXT = """
    favorite favourite great worst minor reliable leading previous upcoming desktop our her their his your
    famous popular premium official native wrapped bridged staked pegged synthetic algorithmic
"""


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


GENERIC_VOCABULARY: frozenset[str] = _word_set(_GENERIC_TEXT)
NAME_NOUNS: frozenset[str] = _word_set(_NAME_NOUN_TEXT)
_FUNCTION_WORDS: frozenset[str] = _word_set(_FUNCTION_WORD_TEXT)
_NOT_NAMES: frozenset[str] = _word_set(_NOT_NAMES_TEXT)

# pyspellchecker counts how often a word occurs in its corpus (OpenSubtitles; 50 = only in a dictionary).
# The ~25,000 English words at least this frequent are "common": a misspelling is looked for only among
# them, and one of them in all caps is emphasis ("is this a SCAM"), not a ticker.
COMMON_COUNT = 500
# Words this long may be two edits from the known word they misspell ("impernament", "overcollaterized").
LONG_WORD = 9
# Longer words are not names (and would make the typo checks slow).
MAX_NAME_LENGTH = 30
# At most this many words of one question go through the slow checks (up to ~0.1 ms each).
MAX_SLOW_WORDS = 16

# "word": count in pyspellchecker's en.json.gz, for words of letters only, below or from COMMON_COUNT (500).
_JSON_RARE_WORD = re.compile(r'"([^\W\d_]+)": (?:\d\d?|[1-4]\d\d)\b')
_JSON_COMMON_WORD = re.compile(r'"([^\W\d_]+)": (?:[5-9]\d\d|[1-9]\d{3,})\b')
_TOKEN = re.compile(r"\$?[^\W_]+(?:['’][^\W_]+)*")
_WORD = re.compile(r"[^\W_]+")
_APOSTROPHE = re.compile(r"['’]")
_ALPHA_RUN = re.compile(r"[^\W\d_]+")
_VERSION_SUFFIX = re.compile(r"v?\d+$")
_SENTENCE_END = frozenset(".!?:;\"'“‘(\n")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_VOWELS = "aeiouy"
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    """For each letter: the keys touching it on a QWERTY keyboard, and the other vowels if it is one."""
    position = {ch: (row, col + 0.5 * row) for row, keys in enumerate(_KEYBOARD_ROWS) for col, ch in enumerate(keys)}
    near: dict[str, str] = {}
    for ch, (row, col) in position.items():
        keys = {o for o, (r, c) in position.items() if o != ch and abs(r - row) <= 1 and abs(c - col) <= 1}
        if ch in _VOWELS:
            keys |= set(_VOWELS) - {ch}
        near[ch] = "".join(sorted(keys))
    return near


_NEAR = _neighbours()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "ers")
_BRITISH = (
    ("isation", "ization"),
    ("isations", "izations"),
    ("ise", "ize"),
    ("ised", "ized"),
    ("ises", "izes"),
    ("ising", "izing"),
    ("iser", "izer"),
    ("isers", "izers"),
    ("yse", "yze"),
    ("ysed", "yzed"),
    ("ysing", "yzing"),
    ("ence", "ense"),
    ("tre", "ter"),
    ("tres", "ters"),
    ("lled", "led"),
    ("lling", "ling"),
    ("ller", "ler"),
    ("ogue", "og"),
    ("ogues", "ogs"),
    ("mme", "m"),
    ("mmes", "ms"),
)

REASON_CAPITALISED = "capitalised word not in the knowledge base or the English word list"
REASON_CAMEL = "CamelCase name not in the knowledge base"
REASON_TICKER = "ticker-like all-caps token not in the knowledge base"
REASON_ALL_CAPS = "all-caps word not in the knowledge base or the English word list"
REASON_DOLLAR = "$-prefixed ticker not in the knowledge base"
REASON_DIGITS = "name with digits not in the knowledge base"
REASON_PLAIN = "word not in the knowledge base or the English word list, nor a misspelling of one"


@dataclass(frozen=True, slots=True)
class UnknownTerm:
    """A word of the question that looks like a name the knowledge base does not know, and why."""

    term: str
    reason: str


@cache
def english_words() -> Mapping[str, int]:
    """pyspellchecker's English words (lower case, letters only): `COMMON_COUNT` for the ~25,000 common ones
    (counted at least that often in its corpus), 1 for the other ~103,000. Read once per process.

    Two regular-expression scans of the JSON file build the dictionary in C: faster than `json.loads` plus a
    loop, and the 160,000-entry dictionary with the entries skipped here ("it's", "a's"...) never exists.
    """
    try:
        raw = resources.files("spellchecker").joinpath("resources", "en.json.gz").read_bytes()
    except OSError:  # the package's layout changed: go through its public API (slower, more memory)
        from spellchecker import SpellChecker

        dictionary = SpellChecker(language="en", distance=1).word_frequency.dictionary
        return {word: COMMON_COUNT if n >= COMMON_COUNT else 1 for word, n in dictionary.items() if word.isalpha()}
    text = gzip.decompress(raw).decode("utf-8")
    words = dict.fromkeys(_JSON_RARE_WORD.findall(text), 1)
    words.update(dict.fromkeys(_JSON_COMMON_WORD.findall(text), COMMON_COUNT))
    return words


def _deletes(word: str) -> set[str]:
    """`word` without one of its letters, every way."""
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _within(a: str, b: str, limit: int) -> bool:
    """True if `a` becomes `b` in at most `limit` edits (insert, delete, replace, swap two neighbours).

    A common prefix and suffix need no edit; at the first difference one of the four edits must happen,
    so trying each with `limit - 1` is exact and, for a limit of 1 or 2, far cheaper than a full table.
    """
    if abs(len(a) - len(b)) > limit:
        return False
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end = 0
    while end < len(a) - start and end < len(b) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start : len(a) - end], b[start : len(b) - end]
    if not a or not b:
        return max(len(a), len(b)) <= limit
    if limit == 0:
        return False
    limit -= 1
    return (
        _within(a[1:], b[1:], limit)
        or _within(a[1:], b, limit)
        or _within(a, b[1:], limit)
        or (len(a) > 1 and len(b) > 1 and a[0] == b[1] and a[1] == b[0] and _within(a[2:], b[2:], limit))
    )


def _letter_mask(word: str) -> int:
    """The set of letters of `word` as bits (any character maps to one of 64 bits)."""
    mask = 0
    for ch in word:
        mask |= 1 << (ord(ch) & 63)
    return mask


def _same_start(word: str, candidate: str) -> bool:
    """Typos keep the first letter, or swap the first two."""
    return word[0] == candidate[0] or (word[1] == candidate[0] and word[0] == candidate[1])


class NameVocabulary:
    """The words the knowledge base knows, plus English and generic crypto words; finds unknown names."""

    def __init__(self, known: Iterable[str], english: Mapping[str, int] | None = None) -> None:
        """`known`: lower-case known words; `english`: as `english_words()` returns (the default)."""
        self._known: frozenset[str] = frozenset(known)
        self._english: Mapping[str, int] = english_words() if english is None else english
        index: dict[str, list[str]] = {}
        long_words: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for word in self._known:
            if len(word) >= 4 and word.isalpha():
                for key in {word} | _deletes(word):
                    index.setdefault(key, []).append(word)
                if len(word) >= LONG_WORD - 2:
                    long_words.setdefault((word[:2], len(word)), []).append((word, _letter_mask(word)))
        # Symmetric-delete index: a word within one edit of a known word shares a key with it.
        self._typo_index: dict[str, str | tuple[str, ...]] = {
            key: words[0] if len(words) == 1 else tuple(words) for key, words in index.items()
        }
        # Long known words (with the set of their letters as a bit mask) by first two letters and length.
        self._long_words: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {
            key: tuple(words) for key, words in long_words.items()
        }

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> NameVocabulary:
        """Build from every question, alternative and answer of the knowledge base."""
        known = set(GENERIC_VOCABULARY)
        for text in texts:
            known.update(word.lower() for word in _WORD.findall(text))
        return cls(known)

    def __len__(self) -> int:
        """How many known words (knowledge base and generic vocabulary)."""
        return len(self._known)

    def is_known(self, word: str) -> bool:
        """True if the knowledge base or the generic vocabulary has `word` (any case)."""
        return word.lower() in self._known

    def unknown_terms(self, question: str) -> list[UnknownTerm]:
        """The words of `question` that look like names the knowledge base does not know, in order."""
        known = self._known
        english = self._english
        matches = list(_TOKEN.finditer(question))
        found: list[UnknownTerm] = []
        context: _Question | None = None
        for i, match in enumerate(matches):
            raw = match.group()
            if "'" in raw or "’" in raw:
                raw = _APOSTROPHE.split(raw, maxsplit=1)[0]
            lower = raw.lower()
            if lower in known:
                continue
            if lower in english and (raw[0].islower() or (not raw.isupper() and not _before_name_noun(matches, i))):
                continue
            if context is None:
                context = _Question(question, matches)
            context.slow_words += 1
            if context.slow_words > MAX_SLOW_WORDS:  # a wall of gibberish or another language: enough said
                break
            term = self._judge(context, i, raw)
            if term is not None and all(term.term.lower() != other.term.lower() for other in found):
                found.append(term)
        return found

    # The slow path, only for words that are neither known nor ordinary English.

    def _judge(self, context: _Question, i: int, raw: str) -> UnknownTerm | None:
        """Decide about one word that is neither known nor lower-case (or uncapitalised) English."""
        word = raw.removeprefix("$")
        lower = word.lower()
        if not word or word[0].isdigit():  # amounts: 5%, 2x, 10k, 0x...
            return None
        if len(word) > MAX_NAME_LENGTH or (len(word) >= 20 and not word.isalpha()):  # hashes, addresses, junk
            return None
        if raw.startswith("$"):
            return None if self._is_known_form(lower) else UnknownTerm(word, REASON_DOLLAR)
        if not word.isalpha():
            return self._judge_alphanumeric(word)
        matches = context.matches
        name_noun = matches[i + 1].group().lower() if _before_name_noun(matches, i) else None
        if word.isupper() and len(word) >= 2:
            if not context.shouting:
                return self._judge_all_caps(word, lower)
        elif len(word) >= 3 and word[-1] == "s" and word[:-1].isupper():  # "PTs", "LSTs": plural acronyms
            return self._judge_all_caps(word, lower[:-1])
        elif word[1:] != word[1:].lower():
            return self._judge_camel(word, lower)
        elif word[0].isupper() and not context.title_case:
            # At the start of a sentence a capital says nothing, unless the noun after it has one too.
            initial = _sentence_initial(context.text, matches[i].start())
            if not initial or (name_noun is not None and matches[i + 1].group()[0].isupper()):
                return self._judge_capitalised(word, lower, name_noun)
        return self._judge_plain(word, lower, name_noun)

    def _judge_all_caps(self, word: str, lower: str) -> UnknownTerm | None:
        """An all-caps word: a ticker unless known, shouted English, or a slip of a known name."""
        if self._english.get(lower, 0) >= COMMON_COUNT or lower in self._known:
            return None
        if (lower.endswith("s") and lower[:-1] in self._known) or self._is_typo(lower, english=False, names=True):
            return None
        return UnknownTerm(word, REASON_TICKER if len(word) <= 6 else REASON_ALL_CAPS)

    def _judge_camel(self, word: str, lower: str) -> UnknownTerm | None:
        """A CamelCase word is a deliberate spelling: only a one-letter slip of a known name is forgiven."""
        if self._is_known_form(lower) or self._is_typo(lower, english=False, limit=1, names=True):
            return None
        return UnknownTerm(word, REASON_CAMEL)

    def _judge_capitalised(self, word: str, lower: str, name_noun: str | None) -> UnknownTerm | None:
        """A capitalised word inside a sentence (not Title Case)."""
        if self._is_known_form(lower):
            return None
        if lower in self._english:  # spelled right on purpose: a name only when it names something
            if name_noun is None or lower in _NOT_NAMES or lower.endswith("est"):
                return None
            return UnknownTerm(
                word, f"capitalised word used as a name (before '{name_noun}') not in the knowledge base"
            )
        if len(word) < 2 or self._is_british(lower) or self._is_typo(lower, english=False):
            return None
        if name_noun is None and self._is_english_typo(lower, strict=True):  # "Beleive", "Occured"
            return None
        return UnknownTerm(word, REASON_CAPITALISED)

    def _judge_plain(self, word: str, lower: str, name_noun: str | None) -> UnknownTerm | None:
        """A lower-case word, or one capitalised only because it starts a sentence or the question is Title Case."""
        if lower in self._english or self._is_known_form(lower) or self._is_british(lower):
            return None
        if len(lower) >= 4:
            if self._is_typo(lower, english=name_noun is None):
                return None
            return UnknownTerm(word, REASON_PLAIN)
        if len(lower) == 3 and name_noun is not None:
            return UnknownTerm(word, f"short word used as a name (before '{name_noun}') not in the knowledge base")
        return None

    def _judge_alphanumeric(self, word: str) -> UnknownTerm | None:
        """Letters and digits ("erc20", "v3", "Zorb3"): a name if a letter run of 3+ is unknown."""
        lower = _VERSION_SUFFIX.sub("", word.lower())
        if not lower or lower in self._known:
            return None
        unknown = [
            run
            for run in _ALPHA_RUN.findall(lower)
            if len(run) >= 3 and run not in self._english and not self._is_known_form(run)
        ]
        if unknown and not any(self._is_typo(run, english=False) for run in unknown):
            return UnknownTerm(word, REASON_DIGITS)
        return None

    def _is_known_form(self, lower: str) -> bool:
        """Known, or a known word with a plural or verb ending ("hodlers", "rugpulled")."""
        if lower in self._known:
            return True
        if lower.endswith("ed") and lower[:-1] in self._known:  # "staked": stake + d
            return True
        return any(
            lower.endswith(suffix) and len(lower) - len(suffix) >= 3 and lower[: -len(suffix)] in self._known
            for suffix in _SUFFIXES
        )

    def _is_british(self, lower: str) -> bool:
        """A British spelling of an English or known word ("decentralised", "behaviour", "defence")."""
        candidates = [lower[: -len(gb)] + us for gb, us in _BRITISH if lower.endswith(gb)]
        if "our" in lower:
            candidates.append(lower.replace("our", "or"))
        return any(c in self._english or c in self._known for c in candidates)

    def _is_typo(self, lower: str, *, english: bool, limit: int | None = None, names: bool = False) -> bool:
        """One edit (two for `LONG_WORD`+ letters) from a known word or, if `english`, one slip from a common
        English word.

        `names`: only known words that are not English count ("AAVEE" is Aave; "mUSV" is not "must").
        """
        if len(lower) < 4:
            return False
        if limit is None:
            limit = 2 if len(lower) >= LONG_WORD else 1
        if self._indexed_within(lower, {lower} | _deletes(lower), limit, names=names):
            return True
        if limit == 2 and self._long_word_within_two(lower, names=names):
            return True
        return english and self._is_english_typo(lower)

    def _long_word_within_two(self, lower: str, *, names: bool) -> bool:
        """A long known word starting with the same two letters (or those two swapped) within two edits of
        `lower` (the one-edit slips, the second letter included, are the typo index's job)."""
        mask = _letter_mask(lower)
        for start in {lower[:2], lower[1] + lower[0]}:
            for length in range(len(lower) - 2, len(lower) + 3):
                for candidate, letters in self._long_words.get((start, length), ()):
                    # Two edits bring in at most two letters the other word lacks: a cheap first filter.
                    if (mask & ~letters).bit_count() > 2 or (letters & ~mask).bit_count() > 2:
                        continue
                    if names and candidate in self._english:
                        continue
                    if _same_start(lower, candidate) and _within(lower, candidate, 2):
                        return True
        return False

    def _indexed_within(self, lower: str, keys: set[str], limit: int, *, names: bool) -> bool:
        """A known word sharing one of `keys` in the typo index lies within `limit` edits of `lower`."""
        index = self._typo_index
        for key in keys:
            found = index.get(key)
            if found is None:
                continue
            for candidate in (found,) if isinstance(found, str) else found:
                if names and candidate in self._english:
                    continue
                if _same_start(lower, candidate) and _within(lower, candidate, limit):
                    return True
        return False

    def _is_english_typo(self, lower: str, *, strict: bool = False) -> bool:
        """One slip from a common English word, the first letter kept: two letters swapped, a letter missing,
        a letter too many (5+ letters), or a letter replaced by a neighbouring key or by another vowel.

        `strict` (for capitalised words, more often names): only a swap or a missing letter, so that
        "Drazzle" stays a name rather than a slip for "drizzle".
        """
        counts = self._english
        threshold = COMMON_COUNT
        for i in range(len(lower) - 1):  # adjacent swaps, the first two letters included
            if counts.get(lower[:i] + lower[i + 1] + lower[i] + lower[i + 2 :], 0) >= threshold:
                return True
        for i in range(1, len(lower) + 1):
            head, tail = lower[:i], lower[i:]
            for letter in _LETTERS:
                if counts.get(head + letter + tail, 0) >= threshold:  # a letter missing
                    return True
            if strict or not tail:
                continue
            if len(lower) >= 5 and counts.get(head + tail[1:], 0) >= threshold:  # a letter too many
                return True
            for letter in _NEAR.get(tail[0], ""):  # a wrong letter
                if counts.get(head + letter + tail[1:], 0) >= threshold:
                    return True
        return False


class _Question:
    """One question's words, and how it uses capitals (worked out only if a word needs it)."""

    def __init__(self, text: str, matches: list[re.Match[str]]) -> None:
        self.text = text
        self.matches = matches
        self.slow_words = 0

    @cached_property
    def _words(self) -> list[re.Match[str]]:
        return [m for m in self.matches if len(m.group()) >= 2 and m.group()[0].isalpha()]

    @cached_property
    def shouting(self) -> bool:
        """Mostly all-caps ("IS QRN A SCAM"): capitals say nothing about names."""
        words = self._words
        return len(words) >= 3 and sum(1 for m in words if m.group().isupper()) >= 0.6 * len(words)

    @cached_property
    def title_case(self) -> bool:
        """Title Case ("Is It Safe To Stake On Lido"): capitals say nothing about names."""
        if self.shouting:
            return True
        inner = [m.group() for m in self._words if not _sentence_initial(self.text, m.start())]
        capitalised = [w for w in inner if w[0].isupper() and not w.isupper()]
        if any(w.lower() in _FUNCTION_WORDS for w in capitalised):
            return True
        return len(inner) >= 4 and len(capitalised) >= 0.75 * len(inner)


def _sentence_initial(question: str, start: int) -> bool:
    """True if only whitespace or sentence punctuation comes before `start` in its sentence."""
    i = start - 1
    while i >= 0 and question[i].isspace():
        i -= 1
    return i < 0 or question[i] in _SENTENCE_END


def _before_name_noun(matches: list[re.Match[str]], i: int) -> bool:
    """True if the word after `matches[i]` is a noun such as "token" or "protocol" that makes it a name."""
    return i + 1 < len(matches) and matches[i + 1].group().lower() in NAME_NOUNS


def from_knowledge_base_file(path: str | Path) -> NameVocabulary:
    """A vocabulary from a knowledge base JSON file (a list of entries with question, alternatives, answer)."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    texts: list[str] = []
    for entry in entries:
        texts.append(entry["question"])
        texts.extend(entry.get("alternatives", []))
        texts.append(entry["answer"])
    return NameVocabulary.from_texts(texts)
