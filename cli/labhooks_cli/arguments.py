"""The ``key=value`` grammar shared by every labhooks command.

``labhooks apply plugin=alignez max_new_tokens=64`` and ``labhooks apply --plugin alignez
--max-new-tokens 64`` mean the same. A bare ``--flag`` is ``flag=true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labhooks.errors import ConfigError


@dataclass
class ParsedArguments:
    """Options by key, plus the positional words, ``--help`` and ``--debug``."""

    options: dict[str, str] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)
    help: bool = False
    debug: bool = False

    def pop(self, key: str, default: str | None = None) -> str | None:
        return self.options.pop(key, default)

    def require(self, key: str, example: str) -> str:
        value = self.options.pop(key, None)
        if value is None or value == "":
            raise ConfigError(f"missing {key}=...; for example: {example}")
        return value


def parse_arguments(words: list[str]) -> ParsedArguments:
    """Split command-line words into options and positional words.

    Raises :class:`ConfigError` for a key given twice or an empty key.
    """
    parsed = ParsedArguments()
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word in ("--help", "-h"):
            parsed.help = True
            continue
        if word == "--debug":
            parsed.debug = True
            continue
        if word.startswith("--"):
            body = word[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif index < len(words) and not words[index].startswith("--") and "=" not in words[index]:
                key, value = body, words[index]
                index += 1
            else:
                key, value = body, "true"
        elif "=" in word:
            key, value = word.split("=", 1)
        else:
            parsed.positional.append(word)
            continue
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"invalid argument {word!r}: expected key=value")
        if key in parsed.options:
            raise ConfigError(f"option {key!r} is given twice ({parsed.options[key]!r} and {value!r}); give it once")
        parsed.options[key] = value
    return parsed
