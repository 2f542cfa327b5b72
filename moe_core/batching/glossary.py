"""The lab's words, defined once: what "safe" and "unsafe" mean in each data mode, and the method's terms.

Why one place: in paired data (a plain harmful request beside the same request jailbroken) "safe" is what
the model did: it refused; in labelled data (your own safe and unsafe prompts) it is the prompt's label,
whatever the model then did. Pages, the report and the README say it the same way, from here.
"""

from __future__ import annotations

RISK_DIFFERENCE = (
    "Risk difference = an expert's activation rate on unsafe tokens minus its rate on safe tokens, "
    "per (layer, expert): red fires more on the unsafe side, blue more on the safe side."
)
BUDGET = "Budget = the share of all routed experts that training may update (1/16 of 384 = 24 experts)."


def safe_unsafe(paired: bool) -> str:
    """One sentence: what the two sides are in this data mode."""
    if paired:
        return (
            "**Safe** = the plain harmful request, which the model refused; **unsafe** = the same request "
            "wrapped in a jailbreak, which the model complied with (paired twins)."
        )
    return (
        "**Safe** and **unsafe** are the labels of your prompts (labelled data); the badge on each answer "
        "says what the model did: refused or complied."
    )


def sides(paired: bool) -> dict[str, tuple[str, str]]:
    """Per side: (heading, one line under it) for the views that show the two sides next to each other."""
    if paired:
        return {
            "safe": (
                "Safe side: plain harmful requests, refused",
                "The plain request: *safe* because the model refused it.",
            ),
            "unsafe": (
                "Unsafe side: the same requests jailbroken, complied with",
                "The same request wrapped in a jailbreak: *unsafe* because the model complied.",
            ),
        }
    return {
        "safe": (
            "Safe side: prompts labelled safe",
            "Your prompts labelled safe; the badge says what the model did.",
        ),
        "unsafe": (
            "Unsafe side: prompts labelled unsafe",
            "Your prompts labelled unsafe; the badge says what the model did.",
        ),
    }
