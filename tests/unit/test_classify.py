"""Bounce classification: real replies of the large mailbox providers and gateways, the
operator's rules file, and its validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tachymail.config import Config, from_dict
from tachymail.delivery.classify import (
    CLASSES,
    BounceClassifier,
    RulesError,
    builtin_rules,
    load_classifier,
    parse_rules,
    rules_problems,
)

MIMECAST = "https://community.mimecast.com/docs/DOC-1369"

# (code, enhanced code, reply text as the client keeps it: the lines joined by spaces and
# the enhanced code repeated at their start, as the provider sends it) -> class.
# Addresses, IPs and message ids of the published examples are replaced by documentation
# values (example.com, 192.0.2.1); nothing else is changed.
PROVIDERS = [
    # Google, "Gmail SMTP errors and codes" (support.google.com/a/answer/3726730) and the
    # full replies quoted at smtp.codes/google.
    (
        550,
        "5.1.1",
        "5.1.1 The email account that you tried to reach does not exist. Please try "
        "5.1.1 double-checking the recipient's email address for typos or "
        "5.1.1 unnecessary spaces. Learn more at "
        "5.1.1 https://support.google.com/mail/?p=NoSuchUser a1si123 - gsmtp",
        "invalid_recipient",
    ),
    (
        550,
        "5.2.1",
        "5.2.1 The email account that you tried to reach is disabled. a1si123 - gsmtp",
        "inactive_mailbox",
    ),
    (
        552,
        "5.2.2",
        "5.2.2 The email account that you tried to reach is over quota. a1si123 - gsmtp",
        "mailbox_full",
    ),
    (
        452,
        "4.2.2",
        "4.2.2 The email account that you tried to reach is over quota. Please direct the "
        "4.2.2 recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp",
        "mailbox_full",
    ),
    (
        450,
        "4.2.1",
        "4.2.1 The user you are trying to contact is receiving mail at a rate that "
        "4.2.1 prevents additional messages from being delivered. Please resend your "
        "4.2.1 message at a later time. - gsmtp",
        "rate_limit",
    ),
    (
        421,
        "4.7.28",
        "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail "
        "originating from your IP address. To protect our users from spam, mail sent from "
        "your IP address has been temporarily rate limited. Please visit "
        "https://support.google.com/mail/?p=UnsolicitedRateLimitError to review our Bulk "
        "Email Senders Guidelines. - gsmtp",
        "rate_limit",
    ),
    (
        421,
        "4.7.0",
        "4.7.0 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail "
        "originating from your IP address. To protect our users from spam, mail sent from "
        "your IP address has been temporarily blocked. - gsmtp",
        "reputation",
    ),
    (
        421,
        "4.7.0",
        "4.7.0 [192.0.2.1] Our system has detected that this message is suspicious due to "
        "the very low reputation of the sending domain. To best protect our users from "
        "spam, the message has been blocked. Please visit "
        "https://support.google.com/mail/answer/188131 for more information. - gsmtp",
        "reputation",
    ),
    (
        421,
        "4.7.0",
        "4.7.0 [192.0.2.1] Our system has detected that this message is suspicious due to "
        "the nature of the content and/or the links within. To best protect our users from "
        "spam, the message has been blocked. - gsmtp",
        "spam_block",
    ),
    (
        550,
        "5.7.1",
        "5.7.1 Our system has detected that this message is likely unsolicited mail. To "
        "reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp",
        "spam_block",
    ),
    (
        550,
        "5.7.26",
        "5.7.26 Unauthenticated email from example.com is not accepted due to domain's "
        "DMARC policy. Please contact the administrator of example.com domain. - gsmtp",
        "policy",
    ),
    (
        550,
        "5.7.1",
        "5.7.1 This message violates example.com email policy. - gcdp a1si123 - gsmtp",
        "policy",
    ),
    (
        550,
        "5.7.25",
        "5.7.25 [192.0.2.1] The IP address sending this message does not have a PTR record "
        "setup, or the corresponding forward DNS entry does not point to the sending IP. "
        "- gsmtp",
        "policy",
    ),
    (
        550,
        "5.7.1",
        "5.7.1 The IP you're using to send mail is not authorized to send email directly to "
        "our servers. Please use the SMTP relay at your service provider instead. - gsmtp",
        "reputation",
    ),
    (
        421,
        "4.7.0",
        "4.7.0 TLS required for RCPT domain, closing connection. - gsmtp",
        "tls_required",
    ),
    (530, "5.7.0", "5.7.0 Must issue a STARTTLS command first. a1si123 - gsmtp", "tls_required"),
    (530, "5.5.1", "5.5.1 Authentication Required. a1si123 - gsmtp", "auth_required"),
    (
        535,
        "5.7.8",
        "5.7.8 Username and Password not accepted. a1si123 - gsmtp",
        "auth_required",
    ),
    (
        552,
        "5.3.4",
        "5.3.4 Your message exceeded Google's message size limits. a1si123 - gsmtp",
        "message_too_large",
    ),
    (
        552,
        "5.7.0",
        "5.7.0 This message was blocked because its content presents a potential security "
        "issue. a1si123 - gsmtp",
        "spam_block",
    ),
    (421, "4.3.0", "4.3.0 Temporary System Problem. Try again later. - gsmtp", "transient"),
    (421, "4.4.5", "4.4.5 Server busy, try again later. - gsmtp", "rate_limit"),
    (
        421,
        "4.7.0",
        "4.7.0 IP not in whitelist for RCPT domain, closing connection. - gsmtp",
        "policy",
    ),
    (451, "4.3.0", "4.3.0 Mail server temporarily rejected message. - gsmtp", "transient"),
    # Microsoft Exchange Online / Outlook.com: the NDR reference on learn.microsoft.com
    # (error codes 5.1.10, 5.4.1, 5.7.606-649, 5.7.700-750, "554 5.2.2 mailbox full") and
    # the Outlook.com block list reply (S3150) quoted at mail.live.com's troubleshooting
    # page; replies as collected at smtp.codes/exchangeonline.
    (
        550,
        "5.1.10",
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "invalid_recipient",
    ),
    (
        550,
        "5.4.1",
        "5.4.1 Recipient address rejected: Access denied. AS(201806281) "
        "[BN1NAM02FT022.eop-nam02.prod.protection.outlook.com]",
        "invalid_recipient",
    ),
    (
        554,
        "5.2.2",
        "5.2.2 mailbox full; "
        "STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionQuotaExceeded",
        "mailbox_full",
    ),
    (
        550,
        "5.7.1",
        "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your "
        "Internet service provider since part of their network is on our block list "
        "(S3150). You can also refer your provider to "
        "http://mail.live.com/mail/troubleshooting.aspx#errors. "
        "[DB3EUR04FT007.eop-eur04.prod.protection.outlook.com]",
        "reputation",
    ),
    (550, "5.7.606", "5.7.606 Access denied, banned sending IP [192.0.2.1].", "reputation"),
    (550, "5.7.708", "5.7.708 Access denied, traffic not accepted from this IP.", "reputation"),
    (
        550,
        "5.7.1",
        "5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus. (AS16012611)",
        "reputation",
    ),
    (
        451,
        "4.7.500",
        "4.7.500 Server busy. Please try again later from [192.0.2.1]. (AS77712344) "
        "[BN1NAM02FT022.eop-nam02.prod.protection.outlook.com]",
        "rate_limit",
    ),
    (
        530,
        "5.7.57",
        "5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM "
        "[AM6PR0732BE0065.eurprd07.prod.outlook.com]",
        "auth_required",
    ),
    # Yahoo: "SMTP error codes" (postmaster.yahooinc.com/error-codes) and Yahoo Help
    # SLN3444 "Email sent to Yahoo Mail addresses is rejected".
    (
        554,
        "",
        "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) "
        "[0] - mta1001.mail.bf1.yahoo.com",
        "invalid_recipient",
    ),
    (
        554,
        "",
        "delivery error: dd Sorry, your message to someone@yahoo.com cannot be delivered. "
        "This account is over quota.",
        "mailbox_full",
    ),
    (
        554,
        "",
        "delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. "
        "This account has been disabled or discontinued",
        "inactive_mailbox",
    ),
    (
        421,
        "4.7.0",
        "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
        "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "rate_limit",
    ),
    (421, "", "Max message per connection reached, closing transmission channel", "rate_limit"),
    (
        553,
        "5.7.1",
        "5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in "
        "Spamhaus's list; see https://postmaster.yahooinc.com/error-codes",
        "reputation",
    ),
    (
        550,
        "5.7.9",
        "5.7.9 This mail has been blocked because the sender is unauthenticated. Yahoo "
        "requires all senders to authenticate with either SPF or DKIM.",
        "policy",
    ),
    (
        554,
        "5.7.9",
        "5.7.9 Message not accepted for policy reasons. See "
        "https://postmaster.yahooinc.com/error-codes",
        "policy",
    ),
    (450, "", "User is receiving mail too quickly", "rate_limit"),
    (
        451,
        "",
        "mx.example.yahoo.com Resources temporarily unavailable. Please try again later [#4.16.1].",
        "transient",
    ),
    # Apple iCloud: support.apple.com/HT204137 (iCloud postmaster), replies as collected
    # at smtp.codes/icloud.
    (550, "5.1.1", "5.1.1 <someone@icloud.com>: user does not exist", "invalid_recipient"),
    (
        550,
        "5.7.1",
        "5.7.1 [CS01] Message rejected due to local policy. Please visit "
        "https://support.apple.com/en-us/HT204137",
        "policy",
    ),
    (
        421,
        "4.7.1",
        "4.7.1 Messages to someone@icloud.com deferred due to excessive volume. Try again "
        "later - https://support.apple.com/en-us/HT204137",
        "rate_limit",
    ),
    (451, "4.7.1", "4.7.1 Service unavailable - try again later", "transient"),
    (
        550,
        "5.7.1",
        "5.7.1 Your message was rejected due to example.com DMARC policy.",
        "policy",
    ),
    (
        550,
        "5.7.1",
        "5.7.1 Your email was rejected due to having a domain present in the Spamhaus DBL "
        "-- see https://www.spamhaus.org/dbl/",
        "spam_block",
    ),
    # Comcast: postmaster.comcast.net "mail error codes" (BL000010: listed on Cloudmark
    # CSI; the 421 texts of its non-specific codes).
    (
        554,
        "",
        "mx.example.comcast.net mx.example.comcast.net 192.0.2.1 found on one or more "
        "DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000010",
        "reputation",
    ),
    (421, "", "Too many sessions opened", "rate_limit"),
    (421, "", "Reverse DNS failure : Try again later", "policy"),
    # GMX / Web.de (United Internet): postmaster.gmx.com "Error messages" and
    # postmaster.web.de; replies as collected at smtp.codes/unitedinternet. GMX sends no
    # enhanced codes.
    (
        554,
        "",
        "gmx.net (mxgmx104) Nemesis ESMTP Service not available No SMTP service IP address "
        "is block listed. For explanation visit "
        "https://postmaster.gmx.net/en/case?c=r0201&i=ip&v=192.0.2.1&r=1MNcgj",
        "reputation",
    ),
    (
        550,
        "",
        "<someone@gmx.net>: Requested action not taken: mailbox unavailable",
        "invalid_recipient",
    ),
    (
        550,
        "",
        "<someone@web.de>: Reject due to SPF policy. The originating IP of the message is "
        "not permitted by the domain owner",
        "policy",
    ),
    (
        550,
        "",
        "Benutzer hat das Speichervolumen ueberschritten. / User has exhausted allowed "
        "storage space.",
        "mailbox_full",
    ),
    # Mail.ru: its published reasons (mailout.ru, "Popular errors ... on the example of
    # Mail.ru"): the phrases its replies carry.
    (550, "", "Message was not accepted -- invalid mailbox. User not found", "invalid_recipient"),
    (552, "", "User quota exceeded", "mailbox_full"),
    # Mimecast: "Mimecast SMTP Error Codes" (community.mimecast.com/docs/DOC-1369).
    (
        550,
        "",
        "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550",
        "invalid_recipient",
    ),
    (
        554,
        "",
        "Email rejected due to security policies - https://community.mimecast.com/docs/DOC-1369#554",
        "spam_block",
    ),
    (550, "", "Rejected by header based Anti-Spoofing policy: someone@example.com", "policy"),
    (550, "", "Administrative prohibition - envelope blocked", "policy"),
    (421, "", "Sender address blocked", "policy"),
    (
        451,
        "",
        "Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451",
        "transient",
    ),
    # Proofpoint: its IP reputation check (ipcheck.proofpoint.com), as in its bounces.
    (
        554,
        "5.7.0",
        "5.7.0 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1",
        "reputation",
    ),
    # Postfix (and so a great many servers): smtpd's own replies, from its source.
    (554, "5.7.1", "5.7.1 <someone@example.com>: Relay access denied", "relay_denied"),
    (
        550,
        "5.1.1",
        "5.1.1 <someone@example.com>: Recipient address rejected: User unknown in local "
        "recipient table",
        "invalid_recipient",
    ),
    (552, "5.3.4", "5.3.4 Error: message file too big", "message_too_large"),
    # Tachymail's own failures (tachymail/smtpclient/routing.py, delivery/pool.py).
    (550, "5.1.2", "5.1.2 example.invalid: no such domain", "dns_failure"),
    (556, "5.1.10", "5.1.10 example.com accepts no mail (null MX)", "dns_failure"),
    (451, "4.4.3", "4.4.3 example.com: DNS lookup failed (timeout)", "dns_failure"),
    (554, "5.4.6", "5.4.6 mail for example.com loops back to myself", "routing"),
    (451, "4.4.1", "4.4.1 connect to mx.example.com: Connection refused", "transient"),
]


@pytest.fixture(scope="module")
def classifier() -> BounceClassifier:
    return load_classifier(Config())


@pytest.mark.parametrize(("code", "enhanced", "text", "expected"), PROVIDERS)
def test_provider_replies(
    classifier: BounceClassifier, code: int, enhanced: str, text: str, expected: str
) -> None:
    assert classifier.classify(code, enhanced, text) == expected


def test_every_builtin_class_is_documented() -> None:
    assert {rule.cls for rule in builtin_rules()} <= set(CLASSES)


def test_a_reply_no_rule_knows_is_unclassified(classifier: BounceClassifier) -> None:
    assert classifier.classify(554, "", "no idea what happened") == ""
    # 4xx replies no text rule knows are at least transient
    assert classifier.classify(450, "", "no idea what happened") == "transient"


def test_a_temporary_user_unknown_does_not_suppress(classifier: BounceClassifier) -> None:
    # a 4xx "user unknown" (a directory that is down) must not be invalid_recipient
    assert classifier.classify(450, "4.1.1", "4.1.1 <a@example.com>: User unknown") == "transient"


def test_operator_rules_come_first_and_add_classes(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[[rule]]\n"
        'class = "greylisted"\n'
        "code = '4\\d\\d'\n"
        "text = 'greylist'\n"
        "[[rule]]\n"
        'class = "reputation"\n'
        "enhanced = '5\\.1\\.1'\n"
        "text = 'NoSuchUser'\n",
        encoding="utf-8",
    )
    config = from_dict({"bounce": {"rules_file": str(rules)}})
    classifier = load_classifier(config)
    assert classifier.classify(450, "4.2.0", "4.2.0 Recipient address rejected: Greylisted") == (
        "greylisted"
    )
    # a capital letter in the operator's pattern: still matched case-insensitively
    gmail = "5.1.1 The email account does not exist https://support.google.com/mail/?p=nosuchuser"
    assert classifier.classify(550, "5.1.1", gmail) == "reputation"
    # everything else still gets the built-in classes
    assert classifier.classify(552, "5.2.2", "5.2.2 mailbox full") == "mailbox_full"


def test_bad_rules_are_named() -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(
            {
                "rule": [
                    {"class": "ok", "text": "fine"},
                    {"class": "broken", "text": "unclosed (group"},
                    {"class": "Bad Name", "code": "5"},
                    {"class": "empty"},
                    {"class": "extra", "text": "x", "colour": "red"},
                ]
            },
            "rules.toml",
        )
    problems = "\n".join(caught.value.problems)
    assert "rules.toml rule 2: text: bad regular expression 'unclosed (group'" in problems
    assert "rules.toml rule 3: class must be a name" in problems
    assert "rules.toml rule 4: needs at least one of code, enhanced, text" in problems
    assert "rules.toml rule 5: unknown key(s) colour" in problems
    assert "rule 1" not in problems


def test_config_check_names_a_bad_regex(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\nclass = \"x\"\ntext = 'a[b'\n", encoding="utf-8")
    config_file = tmp_path / "tachymail.toml"
    config_file.write_text(f'[bounce]\nrules_file = "{rules}"\n', encoding="utf-8")
    assert rules_problems(from_dict({"bounce": {"rules_file": str(rules)}}))
    result = subprocess.run(
        [sys.executable, "-m", "tachymail.cli.main", "config", "check", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"bounce.rules_file: {rules} rule 1: text: bad regular expression 'a[b'" in (
        result.stderr
    )
