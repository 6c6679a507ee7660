"""agents/names.py: made-up names are reported, real questions (typos, casual English, known names) are not.

The vocabulary is built from the real data/knowledge_base.json, as the service builds it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from functools import cache
from pathlib import Path

import pytest

from services.names import (
    MAX_SLOW_WORDS,
    REASON_CAMEL,
    REASON_CAPITALISED,
    REASON_DOLLAR,
    REASON_PLAIN,
    REASON_TICKER,
    NameVocabulary,
    UnknownTerm,
    from_knowledge_base_file,
)

KB_PATH = Path(__file__).resolve().parent.parent / "data" / "knowledge_base.json"


@cache
def vocabulary() -> NameVocabulary:
    entries = json.loads(KB_PATH.read_text(encoding="utf-8"))
    texts = [text for entry in entries for text in (entry["question"], *entry["alternatives"], entry["answer"])]
    return NameVocabulary.from_texts(texts)


def terms(question: str) -> set[str]:
    return {found.term for found in vocabulary().unknown_terms(question)}


# Made-up names in realistic questions, lower and mixed case; each must be reported, and nothing else.
MADE_UP = [
    # protocols
    ("is Yantoro protocol a rug pull?", {"Yantoro"}),
    ("how does yantoro handle liquidations", {"yantoro"}),
    ("Is Zephyrion Finance audited?", {"Zephyrion"}),
    ("what yield does morvane offer on usdc", {"morvane"}),
    ("can I borrow against my ETH on Velantis?", {"Velantis"}),
    ("krellfi vs aave which is safer", {"krellfi"}),
    ("how do I provide liquidity on orbelle", {"orbelle"}),
    ("Tessaro lending pools explained", {"Tessaro"}),
    ("has nimbrax been hacked before?", {"nimbrax"}),
    ("What's the APY on Stravolt vaults?", {"Stravolt"}),
    ("is it safe to approve the Quintara router contract", {"Quintara"}),
    ("is the Ember Protocol audited?", {"Ember"}),
    ("Sparrow Finance apy?", {"Sparrow"}),
    ("is Lumina protocol safe", {"Lumina"}),
    ("is Mellow Vaults legit?", {"Mellow"}),
    ("what happened to the Ossiria exploit", {"Ossiria"}),
    ("yantoro vs plendrix for yield farming", {"yantoro", "plendrix"}),
    ("is zentrova a ponzi", {"zentrova"}),
    ("is Korvex's stablecoin fully backed?", {"Korvex"}),
    ("any news about the Halvori hack", {"Halvori"}),
    ("how risky is lending on Gravitas Markets", {"Gravitas"}),
    ("is axolend safe", {"axolend"}),
    ("compare aave and borrowly", {"borrowly"}),
    ("Velmora vs Aave for stablecoin loans", {"Velmora"}),
    ("is Prystine Finance audited by anyone", {"Prystine"}),
    ("restaking on Tervanis, worth it?", {"Tervanis"}),
    ("how decentralised is Quibbit", {"Quibbit"}),
    ("are Nuvexa yields sustainable?", {"Nuvexa"}),
    ("what does vandelink do exactly", {"vandelink"}),
    ("is vexa a scam", {"vexa"}),
    # tokens and tickers
    ("how do I stake QRN tokens on Quarnix?", {"QRN", "Quarnix"}),
    ("should i buy ZVX before the listing", {"ZVX"}),
    ("what is the max supply of $BLEP", {"BLEP"}),
    ("is KLTR token a good investment", {"KLTR"}),
    ("why did vrnx dump 40% today", {"vrnx"}),
    ("where can I swap WOMBIX for usdc?", {"WOMBIX"}),
    ("is the glimmora token inflationary?", {"glimmora"}),
    ("how do I claim my Fizzaro airdrop", {"Fizzaro"}),
    ("thoughts on DRELL coin?", {"DRELL"}),
    ("how do I unwrap wQRX on Arbitrum", {"wQRX"}),
    ("Quarnix staking rewards seem too high", {"Quarnix"}),
    ("Mirabond token unlock schedule?", {"Mirabond"}),
    ("SNEX airdrop eligibility", {"SNEX"}),
    ("is the ZYN token real", {"ZYN"}),
    ("what happened to $PLOOF", {"PLOOF"}),
    ("how to buy zentoken", {"zentoken"}),
    ("how do I get BRLZ tokens", {"BRLZ"}),
    ("glorp token price", {"glorp"}),
    ("my friend told me to ape into FLIMZ, thoughts?", {"FLIMZ"}),
    ("is $GRUBZ a honeypot", {"GRUBZ"}),
    ("why is quellium token down 80%", {"quellium"}),
    ("Is the OMBRA stablecoin overcollateralized?", {"OMBRA"}),
    ("what's the APR for staking XYLO", {"XYLO"}),
    # bridges
    ("what are the risks of the Plendrix bridge?", {"Plendrix"}),
    ("is the Vornelink bridge safe to use?", {"Vornelink"}),
    ("bridging eth to arbitrum through caspori, any risks?", {"caspori"}),
    ("my funds are stuck on Trellium Bridge, what do I do", {"Trellium"}),
    ("what is the Dravo bridge", {"Dravo"}),
    ("anyone used Crestline Bridge? funds missing", {"Crestline"}),
    ("did the Kallisto bridge get exploited", {"Kallisto"}),
    ("how to bridge to tesselar l2", {"tesselar"}),
    # DAOs
    ("how do I vote in Grumvald DAO?", {"Grumvald"}),
    ("is selvara dao governance centralised", {"selvara"}),
    ("who controls the Brevantis DAO treasury", {"Brevantis"}),
    ("can i trust the Oxbury DAO multisig", {"Oxbury"}),
    ("who runs the Belvora foundation", {"Belvora"}),
    # people
    ("what did Marcus Delvane say about stablecoins", {"Delvane"}),
    ("is Daniel Oskavitz a trustworthy defi influencer", {"Oskavitz"}),
    ("did Lena Morvath really found a lending protocol?", {"Morvath"}),
    ("is crypto guru kevin fezzrow legit", {"fezzrow"}),
    ("who is the founder of Drazzle", {"Drazzle"}),
    ("what does sergei volkonov think about eth", {"volkonov"}),
    ("who is Harlan Pekkonen and why does he shill SNAF", {"Pekkonen", "SNAF"}),
    # chains
    ("how fast is the Zorbit chain?", {"Zorbit"}),
    ("what is the gas token on kelvaro network", {"kelvaro"}),
    ("Is Tindra L2 an optimistic rollup?", {"Tindra"}),
    ("can I bridge usdc to the Pelluxa mainnet", {"Pelluxa"}),
    ("does tarvos chain support evm", {"tarvos"}),
    ("is the Hexor network decentralised", {"Hexor"}),
    ("what chain is Ixxion on", {"Ixxion"}),
    ("Whats the deal with Skarnet chain", {"Skarnet"}),
    ("how do I delegate on the Marrowind network", {"Marrowind"}),
    ("can i mint nfts on the Brakka chain", {"Brakka"}),
    # exchanges and wallets
    ("is Brixolt exchange regulated?", {"Brixolt"}),
    ("fenmora dex has low fees, is it legit?", {"fenmora"}),
    ("withdrawals paused on Luxaro, should I worry", {"Luxaro"}),
    ("can I trust CoinVexa with my savings", {"CoinVexa"}),
    ("is Duvaswap a good dex", {"Duvaswap"}),
    ("is Nexaro a cex", {"Nexaro"}),
    ("Stakefy or Lido for eth staking?", {"Stakefy"}),
    ("should I use Trustora wallet", {"Trustora"}),
    ("is MoonDex safe", {"MoonDex"}),
    ("should I LP on Gobbleswap", {"Gobbleswap"}),
    ("heard about FarnSwap, is it a good amm", {"FarnSwap"}),
    ("is kiprox exchange safe to use in europe", {"kiprox"}),
    ("is jarvex wallet non custodial", {"jarvex"}),
    ("got an airdrop from Zintopia, is it a scam?", {"Zintopia"}),
]

# Misses the rules accept (see the module docstring): kept here so a change in behaviour shows.
KNOWN_MISSES = [
    ("is qrn legit", {"qrn"}),  # a lower-case 3-letter word is only a name before "token", "coin"...
    ("how does kwanza swap work", {"kwanza"}),  # an English word, lower case
    ("how do I stake on Nolo", {"Nolo"}),  # a (rare) English word
    ("is Aavex a fork of aave", {"Aavex"}),  # one letter from Aave: taken for a typo
]

# Real questions: ordinary DeFi questions, typos, names the knowledge base mentions, casual English.
REAL = [
    "What is DeFi?",
    "how does aave work",
    "What is impermanent loss and how do I avoid it?",
    "whats the difference between apy and apr",
    "is uniswap safe to use",
    "How do flash loans work on Aave?",
    "can i lose money staking eth with lido",
    "what happened to Terra Luna and UST?",
    "explain curve wars like im five",
    "how do I revoke token approvals in MetaMask?",
    "what's a seed phrase and where should I keep it",
    "hey can u explain this to me pls",
    "ok thanks, and what about gas fees?",
    "is 5% apy good",
    "2x leverage on eth, when do i get liquidated?",
    "I don't understand how stablecoins keep their peg",
    "why did USDC depeg in 2023?",
    "What is MEV and how does a sandwich attack work?",
    "is restaking on EigenLayer worth the risk?",
    "how does Ethena's USDe stay stable?",
    "What are LSTs and LRTs?",
    "pendle PTs, how do they give a fixed rate",
    "can someone explain rollups vs sidechains",
    "How do I bridge USDC from Ethereum to Arbitrum safely?",
    "is yield farming still profitable in 2025?",
    "what does TVL mean?",
    "how do oracles like Chainlink work?",
    "I got rekt on a memecoin, how do I spot a rug pull next time?",
    "What happened with the FTX collapse?",
    "how did the Ronin bridge hack happen",
    "thx! one more: what's slippage tolerance?",
    "Can you explain how Compound's interest rates are set?",
    "what is a perp dex like dYdX or GMX",
    "how do Pendle yield tokens work",
    "whats a honeypot token",
    "how much gas does a swap cost on mainnet vs l2",
    "WHAT IS A RUG PULL",
    "Is It Safe To Stake On Lido?",
    "What's the role of MakerDAO's DAI savings rate?",
    "gm ser, what are points and airdrops farming?",
    "how does Rocket Pool compare to Lido",
    "whats the risk of depegging for stETH",
    "is Hyperliquid decentralized?",
    "what are the tax implications of defi in the UK",
    "how does Morpho differ from Aave",
    "what is an ERC-20 token",
    "do you know what Euler finance hack was?",
    "explain the behaviour of rebasing tokens",
    "what does overcollateralised mean",
    "could a 51% attack happen on Ethereum?",
    "what's the APR on Curve's 3pool?",
    "how do I set up a Safe multisig wallet?",
    "Why did Celsius go bankrupt?",
    "How do I read a transaction on Etherscan?",
    "what fees does PancakeSwap charge",
    "how do I use 1inch to get the best swap rate?",
    "Is Solana DeFi riskier than Ethereum DeFi?",
    "Can I use my Ledger Nano X with MetaMask?",
    "what is the Merkle tree in a blockchain",
    "i'm from Nigeria, can I use DeFi without a bank account?",
    "what is EIP-1559 and why did gas fees change",
    "How does the Lightning Network work?",
    "does Coinbase Wallet differ from Coinbase the exchange?",
    "Is the Ethereum Foundation selling ETH bad?",
    "what's a Uniswap v4 hook",
    "What is the Sharpe ratio of yield farming strategies?",
    "I lost access to my Gmail, is my wallet safe?",
    "What are blob transactions after Dencun?",
    "is BlackRock's tokenized fund DeFi?",
    "what r the risks of lending on Aave v3",
    # typos
    "what is a liquidaton and how do i avoid it",
    "what is impermanant loss",
    "how does uniswpa v3 concentrated liquidity work",
    "Is Aavee safe?",
    "what's the recieve address for my wallet",
    "how do i definately avoid getting scammed",
    "whats the diff between staking and lending, seperate risks?",
    "teh fees on uniswap are so high, why",
    "whats the diference between a cold wallet and a hot wallet",
    "is impernament loss permanent",
    "what does overcollaterized mean",
    "how do i add colateral on etherium",
    "my tranaction is stuck, shud i speed it up",
    # casual
    "bro i just lost half my bag to a rug, how do i not let that happen again",
    "what's the catch with 20% apy on stablecoins?",
    "honestly confused about gas, why is it so expensive sometimes",
    "hmm ok, so what happens if the oracle price is wrong?",
    "wait so can the devs just take my money??",
    "sorry if this is dumb but what is a token exactly",
    "i accidentally approved a sketchy contract, what should i do right now",
    "My wallet got drained overnight. What are my options?",
    "is it normal that my swap says price impact 15%",
    "Could you summarise the main risks of yield farming?",
    "any tips for keeping my seed phrase safe while travelling",
    "whats the point of governance tokens if whales control votes",
    "yo whats up, quick q about aave liquidations",
    "help!! i think i got drained, what now??",
    "explain like I'm 5: what is a liquidity pool",
    "what do people mean by 'number go up' tokenomics",
    "how do I calculate my liquidation price on a 3x long",
    "any advice for a newbie in crypto?",
]


@pytest.mark.parametrize(("question", "expected"), MADE_UP, ids=[q for q, _ in MADE_UP])
def test_made_up_names_are_reported(question: str, expected: set[str]) -> None:
    assert terms(question) == expected


@pytest.mark.parametrize(("question", "expected"), KNOWN_MISSES, ids=[q for q, _ in KNOWN_MISSES])
@pytest.mark.xfail(strict=True, reason="accepted limitation of the rules")
def test_known_misses(question: str, expected: set[str]) -> None:
    assert terms(question) == expected


@pytest.mark.parametrize("question", REAL)
def test_real_questions_report_nothing(question: str) -> None:
    assert vocabulary().unknown_terms(question) == []


def test_lists_are_large_enough_and_recall_is_met() -> None:
    assert len(MADE_UP) >= 40
    assert len(REAL) >= 60
    expected = sum(len(names) for _, names in MADE_UP + KNOWN_MISSES)
    caught = sum(len(terms(question) & names) for question, names in MADE_UP + KNOWN_MISSES)
    assert caught / expected >= 0.95


def test_reasons_explain_each_rule() -> None:
    found = vocabulary().unknown_terms("how do I stake QRN on Quarnix, or $BLEP via ZapLoop and yantoro?")
    assert found == [
        UnknownTerm("QRN", REASON_TICKER),
        UnknownTerm("Quarnix", REASON_CAPITALISED),
        UnknownTerm("BLEP", REASON_DOLLAR),
        UnknownTerm("ZapLoop", REASON_CAMEL),
        UnknownTerm("yantoro", REASON_PLAIN),
    ]
    (before_noun,) = vocabulary().unknown_terms("is the Ember Protocol audited?")
    assert before_noun.reason == "capitalised word used as a name (before 'protocol') not in the knowledge base"
    (short,) = vocabulary().unknown_terms("how do i stake qrn tokens")
    assert short == UnknownTerm("qrn", "short word used as a name (before 'tokens') not in the knowledge base")


def test_unknown_term_is_frozen() -> None:
    term = UnknownTerm("Yantoro", REASON_CAPITALISED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        term.term = "x"  # type: ignore[misc]


def test_each_name_is_reported_once_as_first_written() -> None:
    assert vocabulary().unknown_terms("is Yantoro or yantoro better, and what about YANTORO") == [
        UnknownTerm("Yantoro", REASON_CAPITALISED)
    ]


def test_possessives_urls_numbers_and_addresses() -> None:
    assert terms("is Plendrix's bridge safe?") == {"Plendrix"}
    assert terms("is https://yantoro.xyz the real site") == {"yantoro"}
    assert terms("I sent 0.5 ETH to 0x3fC91A3afd70395Cd496C647d5a6CC9D4B2b7FAD at 3am, 10x gas, 24h ago") == set()
    assert terms("what is Uniswap v3 vs v4 and ETH2 vs web3") == set()
    assert terms("Yantoro-Fi yield?") == {"Yantoro"}


def test_names_the_knowledge_base_mentions_are_known() -> None:
    vocab = vocabulary()
    for name in ("Aave", "Uniswap", "Lido", "EigenLayer", "Hyperliquid", "Ethena", "Pendle", "Morpho", "Curve"):
        assert vocab.is_known(name)
        assert terms(f"is {name} safe?") == set()
    for word in ("defi", "apy", "tvl", "hodl", "wagmi", "gwei", "memecoin", "metamask", "ledger", "erc20", "l2"):
        assert vocab.is_known(word)


def test_the_vocabulary_is_the_knowledge_base_it_is_given() -> None:
    tiny = NameVocabulary.from_texts(["What is Yantoro?", "Yantoro is a lending protocol on QRN chain."])
    assert tiny.unknown_terms("is Yantoro safe?") == []
    assert tiny.unknown_terms("stake QRN on Yantoro") == []
    assert [t.term for t in tiny.unknown_terms("is Plendrix safe?")] == ["Plendrix"]
    assert len(tiny) > len(tiny.unknown_terms("x"))


def test_from_knowledge_base_file_matches_from_texts() -> None:
    from_file = from_knowledge_base_file(KB_PATH)
    assert len(from_file) == len(vocabulary())
    for question, expected in MADE_UP[:10]:
        assert {t.term for t in from_file.unknown_terms(question)} == expected


def test_title_case_and_shouting_say_nothing_about_names() -> None:
    assert terms("What Is The Best Way To Use Aave?") == set()
    assert terms("HOW DO I STAKE ETH ON LIDO") == set()
    assert terms("Is Yantoro Protocol A Scam?") == {"Yantoro"}
    assert terms("IS YANTORO A SCAM") == {"YANTORO"}


def test_work_per_question_is_bounded() -> None:
    """Gibberish and junk stop early; their cost is measured in bench/, not asserted here."""
    vocab = vocabulary()
    random.seed(7)
    gibberish = " ".join("".join(random.choices(string.ascii_lowercase, k=9)) for _ in range(100))
    found = vocab.unknown_terms(gibberish)
    assert 0 < len(found) <= MAX_SLOW_WORDS  # the slow checks stop after a bounded number of words
    for junk in ("x" * 5000, "DRpbCBMxVnDK7maPM5tGv6MvB3v1sRMC86PZ8okm21hy", "word " * 2000):
        assert vocab.unknown_terms(junk) == []
