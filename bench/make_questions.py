"""Generate bench/questions.txt: 20,000 distinct DeFi questions (every combination) for the unique-question phases.

Deterministic (no randomness): every (template, topic, phrasing) combination is built, the list is
visited in a fixed coprime-stride order so neighbouring lines differ in topic and wording, and the
first QUESTION_COUNT lines that are distinct *after the cache's normalisation* (NFKC, lower case,
single spaces) are kept. No line contains a pronoun ("it", "its", "this"...) or starts with "what
about", so in a WebSocket session no question is rewritten as a follow-up of the previous one.

    python -m bench.make_questions            # rewrite bench/questions.txt
    python -m bench.make_questions --check    # exit 1 if the file is not what this script makes
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from agents.followup import looks_like_follow_up
from services.text import normalize_text

OUTPUT = Path(__file__).resolve().parent / "questions.txt"
QUESTION_COUNT = 20_000  # every combination; a full `make bench` sends ~12,300 before the soak, none twice

TOPICS = [
    "impermanent loss",
    "a flash loan",
    "an automated market maker",
    "a constant product market maker",
    "Uniswap v3 concentrated liquidity",
    "a liquidity pool",
    "yield farming",
    "liquidity mining",
    "a liquidation on Aave",
    "the health factor on Aave",
    "overcollateralized lending",
    "a collateral ratio",
    "a stablecoin",
    "an algorithmic stablecoin",
    "the DAI stablecoin",
    "a stablecoin depeg",
    "USDC reserves",
    "liquid staking",
    "stETH from Lido",
    "restaking on EigenLayer",
    "MEV",
    "a sandwich attack",
    "front-running on a DEX",
    "slippage tolerance",
    "price impact on a swap",
    "a cross-chain bridge",
    "a bridge hack",
    "a wrapped token like WBTC",
    "a smart contract audit",
    "a rug pull",
    "an oracle manipulation attack",
    "a Chainlink price oracle",
    "a TWAP oracle",
    "governance tokens",
    "a DAO vote",
    "vote escrow tokenomics like veCRV",
    "the Curve stableswap curve",
    "a Balancer weighted pool",
    "a perpetual futures DEX",
    "funding rates on perps",
    "an options vault",
    "a yield aggregator like Yearn",
    "auto-compounding vaults",
    "APR versus APY",
    "gas fees on Ethereum",
    "a layer 2 rollup",
    "an optimistic rollup",
    "a zk rollup",
    "token approvals",
    "an unlimited token allowance",
    "a self-custody wallet",
    "a seed phrase",
    "a hardware wallet",
    "a multisig wallet",
    "account abstraction",
    "a DEX aggregator",
    "an order book DEX",
    "a limit order on a DEX",
    "a lending pool utilization rate",
    "variable borrow rates",
    "a stablecoin peg arbitrage",
    "arbitrage bots",
    "protocol-owned liquidity",
    "a liquidity bootstrapping pool",
    "an airdrop",
    "a token unlock schedule",
    "total value locked",
    "real world assets in DeFi",
    "tokenized treasury bills",
    "a synthetic asset",
    "DeFi insurance",
    "a smart contract exploit",
    "a reentrancy bug",
    "an admin key risk",
    "a timelock on upgrades",
    "an upgradeable proxy contract",
    "a decentralized exchange",
    "a centralized exchange withdrawal to DeFi",
    "bridging ETH to Arbitrum",
    "staking ETH with a validator",
    "slashing for validators",
    "a liquid staking depeg",
    "a leveraged yield farm",
    "a recursive borrowing loop",
    "a delta neutral strategy",
    "a stablecoin yield strategy",
    "the Compound cToken model",
    "an interest bearing token like aUSDC",
    "a flash loan attack",
    "a governance attack",
    "a Sybil attack on an airdrop",
    "a phishing approval scam",
    "a honeypot token",
    "a memecoin launch on a bonding curve",
    "a concentrated liquidity range",
    "LP tokens",
    "an ERC-4626 vault",
    "a stablecoin swap on Curve",
    "the Uniswap fee tiers",
    "a DeFi tax event",
]

TEMPLATES = [
    "what is {t}",
    "how does {t} work",
    "what are the main risks of {t}",
    "can you explain {t} to a beginner",
    "is {t} safe for a small investor",
    "why does {t} matter for liquidity providers",
    "what should I check before using {t}",
    "how do people make money with {t}",
    "what can go wrong with {t}",
    "how is {t} different on Ethereum and on a layer 2",
    "give me a simple example of {t}",
    "what fees are involved with {t}",
    "who benefits the most from {t}",
    "how do I avoid losing funds with {t}",
    "what is the history behind {t}",
    "how risky is {t} during a market crash",
    "does {t} need a trusted third party",
    "what happens to my deposit with {t} if prices drop",
    "what do experienced traders say about {t}",
    "how would you describe {t} in one paragraph",
    "which protocols are known for {t}",
    "should a newcomer try {t}",
    "what numbers should I watch with {t}",
    "how can {t} be abused by attackers",
    "what is a common misconception about {t}",
]

PHRASINGS = [
    "{q}?",
    "quick question: {q}?",
    "{q}, in simple terms?",
    "eli5 {q}",
    "hey, {q}?",
    "I'm new to crypto, {q}?",
    "{q} in DeFi?",
    "{q} (short answer please)",
]


def _stride(total: int) -> int:
    """A step coprime with `total`, near total / golden ratio, so the walk visits every index once."""
    step = int(total / 1.618033988749895)
    while math.gcd(step, total) != 1:
        step += 1
    return step


def generate(count: int = QUESTION_COUNT) -> list[str]:
    """The first `count` distinct questions of the fixed walk over templates x topics x phrasings."""
    combos = [(template, topic, phrasing) for template in TEMPLATES for topic in TOPICS for phrasing in PHRASINGS]
    total = len(combos)
    step = _stride(total)
    seen: set[str] = set()
    questions: list[str] = []
    for position in range(total):
        template, topic, phrasing = combos[(position * step) % total]
        question = phrasing.format(q=template.format(t=topic))
        question = question[0].upper() + question[1:]
        key = normalize_text(question)
        if key in seen or looks_like_follow_up(question):
            continue
        seen.add(key)
        questions.append(question)
        if len(questions) == count:
            return questions
    raise SystemExit(f"only {len(questions)} distinct questions available, {count} requested")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=QUESTION_COUNT)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="verify the file instead of writing it")
    args = parser.parse_args(argv)
    text = "\n".join(generate(args.count)) + "\n"
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run python -m bench.make_questions", file=sys.stderr)
            return 1
        print(f"{args.output}: {args.count} distinct questions, up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.count} distinct questions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
