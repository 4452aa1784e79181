"""Find and mask secrets (API keys, tokens, private keys, passwords) and PII (e-mail and IP addresses) in text:
one detector for data, evaluation output and the server.

Two sources of rules: the regex plugins of Yelp's ``detect-secrets`` (AWS, GitHub, GitLab, Slack, Stripe, JWT,
...) and our own for formats it lacks or only flags by their header (OpenAI-style ``sk-`` keys, Hugging Face and
Google keys, whole PEM private-key blocks, passwords and keys assigned to names such as ``db_password``,
credentials in connection strings, e-mail and public IP addresses). As in BigCode's PII pipeline, candidates then
pass false-positive filters: hashes, UUIDs, placeholders (``YOUR_API_KEY``, ``<KEY>``, ``${TOKEN}``), values that
do not look random where only randomness marks a secret, documentation domains (``example.com``) and addresses
(``192.0.2.0/24``, ``2001:db8::/32``, private and reserved ranges) are not findings.

Speed: each rule has literal *triggers*; the rule's regex runs only on the lines holding one (the whole text
from there for multi-line rules), since most regexes cost far more than a substring search.

Findings other than PEM blocks never contain whitespace, which lets a stream be masked piece by piece at
whitespace boundaries (``serve/``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

REDACTED = "[REDACTED:{kind}]"

# The detector families a caller may pick (data.redact_detectors): every secret rule, e-mail, IP addresses.
DETECTORS = ("secrets", "email", "ip_address")


@dataclass(frozen=True)
class Finding:
    start: int  # character offsets in the text: text[start:end] is the secret
    end: int
    kind: str  # e.g. github_token, private_key, email
    detector: str  # which rule found it: detect-secrets:<Plugin> or codex-ml:<name>


@dataclass(frozen=True)
class _Rule:
    kind: str
    detector: str
    family: str  # one of DETECTORS
    pattern: re.Pattern
    group: int  # the group holding the secret; 0 the whole match; -1 found by _span
    triggers: tuple  # literal strings (or literal-led regexes): a line without one cannot match
    multiline: bool = False
    keep: Callable[[str, re.Match], bool] | None = None  # False: a false positive


# ---------------------------------------------------------------- false-positive filters

_PLACEHOLDER_WORDS = (
    "your",
    "example",
    "xxxx",
    "changeme",
    "change_me",
    "dummy",
    "placeholder",
    "redacted",
    "sample",
    "fake",
    "secret_here",
    "key_here",
    "insert",
    "replace",
    "todo",
    "****",
    "....",
)
_TEMPLATE = re.compile(r"\$\{|\{\{|\{[A-Za-z_0-9]*\}|%\(|%[sdr]|^\$|^<[^<>]+>$|^\[[^\[\]]+\]$")
_HEX = re.compile(r"[0-9a-fA-F]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_placeholder(value: str) -> bool:
    """``YOUR_API_KEY``, ``<KEY>``, ``${TOKEN}``, ``%(password)s``, ``xxxxxxxx``: not secrets."""
    low = value.lower()
    return any(w in low for w in _PLACEHOLDER_WORDS) or bool(_TEMPLATE.search(value)) or len(set(value)) <= 3


def looks_like_a_name(value: str) -> bool:
    """``GITHUB_TOKEN``, ``db_password``, ``hunter``: one case of letters and no digits, a name or a word. Where a
    keyword alone marks a value as secret (``password = ...``), such values are names, not secrets."""
    return bool(re.fullmatch(r"[A-Z_.-]+|[a-z_.-]+", value))


def is_hash_or_uuid(value: str) -> bool:
    """Hex digests (MD5, SHA-1, SHA-2) and UUIDs are what code pins, not credentials."""
    return (bool(_HEX.fullmatch(value)) and len(value) in (32, 40, 56, 64, 96, 128)) or bool(_UUID.fullmatch(value))


def looks_random(value: str) -> bool:
    """Gibberish, as keys and tokens are: at least two character classes and 3 bits of entropy per character."""
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]"))
    counts = Counter(value)
    entropy = -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())
    return classes >= 2 and entropy >= 3.0


def _value_ok(value: str, _m: re.Match) -> bool:
    return not (is_placeholder(value) or is_hash_or_uuid(value))


def _assigned_ok(value: str, m: re.Match) -> bool:
    return _value_ok(value, m) and not looks_like_a_name(value)


def _random_value(value: str, m: re.Match) -> bool:
    return _assigned_ok(value, m) and looks_random(value)


_DOC_DOMAINS = ("example.com", "example.org", "example.net", "example.edu")
_DOC_SUFFIXES = (".example", ".test", ".invalid", ".localhost", ".local")
# "icon@2x.png", "module@1.2.js": file names, not addresses
_FILE_SUFFIXES = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "py", "js", "ts", "css", "html", "json", "txt"}


def _email_ok(value: str, _m: re.Match) -> bool:
    domain = value.rsplit("@", 1)[1].lower()
    if domain in _DOC_DOMAINS or domain.endswith(_DOC_SUFFIXES) or any(domain.endswith("." + d) for d in _DOC_DOMAINS):
        return False
    if domain.rsplit(".", 1)[-1] in _FILE_SUFFIXES or domain == "localhost":
        return False
    return not any(w in value.lower() for w in _PLACEHOLDER_WORDS)


_VERSION_BEFORE = re.compile(r"(?i)\b(?:version|ver|release|v)[\s\"'=:(_-]*$")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NETWORK_WORDS = re.compile(
    r"(?i)\b(?:ip|ipv4|host|hostname|addr|address|server|dns|resolver|upstream|proxy|gateway|"
    r"bind|listen|connect|nameserver|peer|endpoint|url)s?\b|://"
)


def _ip_ok(value: str, m: re.Match) -> bool:
    """Public addresses only (documentation, private, loopback, reserved ranges excluded), and not a version."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    if not ip.is_global or (ip.version == 6 and (ip not in _GLOBAL_UNICAST or value.count(":") < 2)):
        return False
    line_start = m.string.rfind("\n", 0, m.start()) + 1
    if _VERSION_BEFORE.search(m.string[max(line_start, m.start() - 24) : m.start()]):
        return False
    # "7.1.4.34", "section 8.2.4.44": versions and section numbers look like addresses; addresses usually have
    # several multi-digit octets, and the rest stand on a line that speaks of networks
    if ip.version == 4 and sum(len(o) >= 2 for o in value.split(".")) < 3:
        line_end = m.string.find("\n", m.end()) % (len(m.string) + 1)
        return bool(_NETWORK_WORDS.search(m.string[line_start:line_end]))
    return True


def _connection_ok(value: str, m: re.Match) -> bool:
    return _assigned_ok(value, m) and value.lower() not in ("password", "passwd", "pass", "pwd", "secret")


# ---------------------------------------------------------------- the rules

_CASES = lambda *words: tuple(v for w in words for v in (w, w.capitalize(), w.upper()))  # noqa: E731
_NAME_BEFORE = r"(?<![A-Za-z0-9])"  # the name ends with the keyword: db_password, SMTP_PASSWORD, self.api_key
_QUOTED_VALUE = r"[\"']?\s*[:=]\s*[rbf]?[\"']([^\"'\s\\]{{{n},}})[\"']"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# (kind, family, pattern, group, triggers, multiline, filter)
_OWN_RULES = [
    (
        "private_key",
        "secrets",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
        0,
        ("PRIVATE KEY",),
        True,
        None,
    ),
    (
        "openai_key",
        "secrets",
        r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}",
        0,
        ("sk-",),
        False,
        _random_value,
    ),
    ("github_token", "secrets", r"github_pat_[A-Za-z0-9_]{22,}", 0, ("github_pat_",), False, None),
    ("huggingface_token", "secrets", r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}", 0, ("hf_",), False, _random_value),
    ("google_api_key", "secrets", r"AIza[0-9A-Za-z_-]{35}", 0, ("AIza",), False, None),
    ("codex_ml_key", "secrets", r"cmk-[A-Za-z0-9_-]{32,}", 0, ("cmk-",), False, None),
    (
        "aws_secret_key",
        "secrets",
        r"(?i)aws_secret_access_key[\"']?\s*[=:]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
        1,
        _CASES("aws_secret_access_key"),
        False,
        _value_ok,
    ),
    (
        "password",
        "secrets",
        r"(?i)" + _NAME_BEFORE + r"(?:password|passwd|passwort|pwd|pass)" + _QUOTED_VALUE.format(n=6),
        1,
        _CASES("pass", "pwd"),
        False,
        _assigned_ok,
    ),
    (
        "assigned_secret",
        "secrets",
        r"(?i)"
        + _NAME_BEFORE
        + r"(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key(?:[_-]?id)?|private[_-]?key|(?:access|auth|api|bearer|"
        r"refresh|session)?[_-]?token|client[_-]?secret|credentials?)" + _QUOTED_VALUE.format(n=8),
        1,
        _CASES("key", "secret", "token", "credential"),
        False,
        _random_value,
    ),
    (
        "connection_string",
        "secrets",
        r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@\"'<>]+:([^\s@/\"'<>]+)@[^\s\"'@]",
        1,
        ("://",),
        False,
        _connection_ok,
    ),
    (
        "email",
        "email",
        r"(?<![\w.%+:/-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
        r"[A-Za-z]{2,24}(?![\w@-])",
        0,
        ("@",),
        False,
        _email_ok,
    ),
    (
        "ip_address",
        "ip_address",
        rf"(?<![\w.-]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w-]|\.\d)",
        0,
        (re.compile(r"\.\d{1,3}\.\d{1,3}\.\d"),),
        False,
        _ip_ok,
    ),
    (
        "ip_address",
        "ip_address",
        r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:.])",
        0,
        ("::", re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")),
        False,
        _ip_ok,
    ),
]

# Triggers of the detect-secrets plugins we use: the literal every match of the plugin's patterns contains.
_PLUGIN_TRIGGERS = {
    "ArtifactoryDetector": ("AKC", "AP"),
    "AWSKeyDetector": (re.compile("A(?:3T|BIA|CCA|KIA|SIA)"), *_CASES("aws")),
    "AzureStorageKeyDetector": ("AccountKey=",),
    "GitHubTokenDetector": (re.compile("gh[pousr]_"),),
    "GitLabTokenDetector": ("gl", "GR1348941"),
    "JwtTokenDetector": ("eyJ",),
    "MailchimpDetector": ("-us",),
    "NpmDetector": ("_authToken",),
    "OpenAIDetector": ("T3BlbkFJ",),
    "PypiTokenDetector": ("pypi-",),
    "SendGridDetector": ("SG.",),
    "SlackDetector": ("xox", "hooks.slack.com"),
    "SquareOAuthDetector": ("sq0csp-",),
    "StripeDetector": ("k_live_",),
    "TwilioKeyDetector": ("AC", "SK"),
}
# detect-secrets plugins left out, and why: our ip_address excludes documentation and reserved ranges; the keyword
# plugins (cloudant, IBM, SoftLayer) need their own context rules (our password and assigned_secret cover that
# shape); our private_key masks the whole PEM block; our connection_string filters placeholder passwords; Discord
# and Telegram tokens have no literal to trigger on and scanning every line for them costs more than all other
# rules together.
_SKIPPED_PLUGINS = {
    "IPPublicDetector",
    "CloudantDetector",
    "IbmCloudIamDetector",
    "IbmCosHmacDetector",
    "SoftlayerDetector",
    "PrivateKeyDetector",
    "BasicAuthDetector",
    "DiscordBotTokenDetector",
    "TelegramBotTokenDetector",
}


def _kind(secret_type: str) -> str:
    """detect-secrets' "GitHub Token" as ``github_token``."""
    return re.sub(r"[^a-z0-9]+", "_", secret_type.lower()).strip("_")


@lru_cache(maxsize=1)
def _rules() -> list[_Rule]:
    """Every rule, detect-secrets' first; a plugin we neither use nor skip is an error, not a silent gap."""
    import importlib
    import pkgutil
    import warnings

    # detect-secrets' logger calls logging.captureWarnings(True) when its modules load, which would send every
    # later warning of the process (pass@k, sandbox) to an unconfigured logger instead of stderr: undo it
    showwarning = warnings.showwarning
    try:
        import detect_secrets.plugins as plugins
        from detect_secrets.plugins.base import RegexBasedDetector

        modules = [
            importlib.import_module(f"detect_secrets.plugins.{info.name}")
            for info in sorted(pkgutil.iter_modules(plugins.__path__), key=lambda m: m.name)
        ]
    finally:
        warnings.showwarning = showwarning

    out = []
    for module in modules:
        for name in sorted(dir(module)):
            cls = getattr(module, name)
            if (
                not (
                    isinstance(cls, type)
                    and issubclass(cls, RegexBasedDetector)
                    and cls is not RegexBasedDetector
                    and cls.__module__ == module.__name__
                )
                or name in _SKIPPED_PLUGINS
            ):
                continue
            if name not in _PLUGIN_TRIGGERS:
                raise RuntimeError(
                    f"detect-secrets plugin {name} has no trigger in codex_ml.data.secrets: "
                    "add it to _PLUGIN_TRIGGERS or _SKIPPED_PLUGINS"
                )
            # detect-secrets declares denylist and secret_type as abstract properties; each plugin class
            # overrides them with plain class attributes, which its typing cannot express.
            for pattern in cls.denylist:  # type: ignore[attr-defined]
                out.append(
                    _Rule(
                        _kind(cls.secret_type),  # type: ignore[arg-type]
                        f"detect-secrets:{name}",
                        "secrets",
                        pattern,
                        -1,
                        _PLUGIN_TRIGGERS[name],
                        keep=_value_ok,
                    )
                )
    for kind, family, pattern, group, triggers, multiline, keep in _OWN_RULES:
        out.append(_Rule(kind, f"codex-ml:{kind}", family, re.compile(pattern), group, triggers, multiline, keep))
    return out


@lru_cache(maxsize=1)
def _any_trigger() -> re.Pattern:
    """One pattern matching wherever any rule's trigger does: a text without a match has no finding."""
    parts = {re.escape(t) if isinstance(t, str) else t.pattern for rule in _rules() for t in rule.triggers}
    return re.compile("|".join(sorted(parts)))


_DELIMITERS = " \t\r\n\"'=:"
_TOKEN_CHAR = re.compile(r"[A-Za-z0-9_+/=-]")


def _span(match: re.Match, group: int) -> tuple[int, int]:
    """The secret's span: the named group, else the longest whitespace-free group of 8+ characters (plugins
    capture the value after a keyword), else the whole match without the delimiters some patterns include."""
    if group >= 0:
        return match.span(group)
    groups = [
        i
        for i in range(1, (match.re.groups or 0) + 1)
        if match.group(i) and len(match.group(i)) >= 8 and not re.search(r"\s", match.group(i))
    ]
    if groups:
        return match.span(max(groups, key=lambda i: len(match.group(i))))
    start, end = match.span()
    text = match.string
    while end < len(text) and _TOKEN_CHAR.match(text, end):  # lazy patterns (JWT) stop short of the secret's end
        end += 1
    while start < end and text[start] in _DELIMITERS:
        start += 1
    while end > start and text[end - 1] in _DELIMITERS:
        end -= 1
    return start, end


def _windows(text: str, triggers: tuple, multiline: bool) -> list[tuple[int, int]]:
    """The (start, end) ranges worth scanning: each line holding a trigger (to the end for multi-line rules)."""
    hits = []
    for trigger in triggers:
        if isinstance(trigger, str):
            at = text.find(trigger)
            while at != -1:
                hits.append(at)
                at = text.find(trigger, at + len(trigger))
        else:
            hits += [m.start() for m in trigger.finditer(text)]
    if not hits:
        return []
    windows: list[tuple[int, int]] = []
    for at in sorted(hits):
        if windows and at < windows[-1][1]:
            continue
        start = text.rfind("\n", 0, at) + 1
        end = len(text) if multiline else (text.find("\n", at) % (len(text) + 1))
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(end, windows[-1][1]))
        else:
            windows.append((start, end))
    return windows


def check_detectors(detectors: Iterable[str]) -> list[str]:
    """``detectors`` as a list, each one of DETECTORS; ValueError naming an unknown one."""
    out = list(detectors)
    unknown = [d for d in out if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown secret detector {unknown[0]!r}; known: {', '.join(DETECTORS)}")
    return out


def find_secrets(text: str, detectors: Iterable[str] = DETECTORS) -> list[Finding]:
    """Every secret and PII found in ``text`` by the families ``detectors`` (default: all), sorted by position;
    overlapping findings are merged into the first."""
    families = set(check_detectors(detectors))
    if not _any_trigger().search(text):
        return []  # most lines of code hold no rule's trigger: one search instead of one per rule
    raw = []
    for rule in _rules():
        if rule.family not in families:
            continue
        for lo, hi in _windows(text, rule.triggers, rule.multiline):
            for m in rule.pattern.finditer(text, lo, hi):
                start, end = _span(m, rule.group)
                if end > start and (rule.keep is None or rule.keep(text[start:end], m)):
                    raw.append(Finding(start, end, rule.kind, rule.detector))
    raw.sort(key=lambda f: (f.start, -f.end))
    merged: list[Finding] = []
    for f in raw:
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            if f.end > last.end:
                merged[-1] = Finding(last.start, f.end, last.kind, last.detector)
            continue
        merged.append(f)
    return merged


def replace_findings(text: str, findings: list[Finding], replacement: Callable[[Finding], str]) -> str:
    """``text`` with each of ``findings`` (sorted, not overlapping) replaced by ``replacement(finding)``."""
    parts, at = [], 0
    for f in findings:
        parts += [text[at : f.start], replacement(f)]
        at = f.end
    parts.append(text[at:])
    return "".join(parts)


def mask_secrets(text: str) -> tuple[str, list[Finding]]:
    """``text`` with each secret replaced by ``[REDACTED:<kind>]``, and the findings (offsets in ``text``)."""
    findings = find_secrets(text)
    if not findings:
        return text, findings
    return replace_findings(text, findings, lambda f: REDACTED.format(kind=f.kind)), findings
