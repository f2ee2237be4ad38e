"""Secrets and PII never reach logs or messages: URLs, DSNs, emails, IPv4 and IPv6 addresses."""
from __future__ import annotations

import pytest

from migrator.core.redact import redact_secrets, redact_text, redact_url


@pytest.mark.parametrize("url, secret", [
    ("postgresql://app:s3cret@db:5432/threadr", "s3cret"),
    ("redis://:s3cret@cache:6379/0", "s3cret"),
    ("redis//:s3cret@cache:6379/0", "s3cret"),  # a typo is no reason to print the password
    ("host=db user=app password=s3cret dbname=threadr", "s3cret"),
    ("amqp://guest:s3cret@broker:5672//", "s3cret"),
])
def test_passwords_are_masked_in_urls_and_dsns(url, secret):
    assert secret not in redact_url(url)
    if "://" in url or "=" in url:  # what messages quote: well-formed URLs and DSNs
        assert secret not in redact_text(f"cannot connect to {url}: refused")


def test_urls_without_secrets_are_left_readable():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("postgresql://postgres@127.0.0.1:5432/x") == "postgresql://postgres@127.0.0.1:5432/x"


@pytest.mark.parametrize("text, hidden", [
    ("threadr:premium:email:ann.lee@example.com", "ann.lee@example.com"),
    ("threadr:usage:ip:2001:db8::1:daily:2026-11-27", "db8::1"),
    ("threadr:premium:ip:203.0.113.7", "113.7"),
    ("threadr:failed_login:a@x.io:2001:db8::2", "a@x.io"),
])
def test_emails_and_addresses_are_masked(text, hidden):
    assert hidden not in redact_text(text)


def test_times_of_day_are_not_taken_for_ipv6():
    assert redact_text("at 2026-01-01 12:30:45+00") == "at 2026-01-01 12:30:45+00"


def test_masking_takes_linear_time_on_half_a_megabyte_of_adversarial_text():
    """A key name may be 512 KB of anything; masking it must not take minutes (it ran in
    quadratic time and stalled a batch). A child process with a deadline, not a timing."""
    import subprocess
    import sys

    code = ("from migrator.core.redact import redact_text\n"
            "n = 512 * 1024\n"
            "for text in ['x' * n, 'a.' * n, 'a@' * n, '1.' * n, 'a:' * n, '::' * n, 'http://' * (n // 4), 'a@b.' * n]:\n"
            "    redact_text(text)\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_service_s_error_keeps_the_server_s_address_and_masks_only_secrets_and_emails():
    said = ('connection to server at "10.0.3.4", port 5432 failed: FATAL: password authentication failed for user '
            '"ann.lee@example.com" of postgresql://ann:s3cret@10.0.3.4:5432/threadr')
    shown = redact_secrets(said)
    assert '"10.0.3.4", port 5432' in shown and "@10.0.3.4:5432/threadr" in shown
    assert "s3cret" not in shown and "ann.lee@example.com" not in shown
    assert "10.0.3.4" not in redact_text(said)  # anything that may quote data masks addresses too
