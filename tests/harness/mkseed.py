#!/usr/bin/env python3
"""Write the harness's fixed seed messages into OUTDIR as NN-name.eml files.

Every message is RFC 5322 with CRLF line endings and the same bytes on every
run (no randomness, fixed dates and Message-IDs), so tests may compare what
IMAP FETCH BODY[] / POP3 RETR return with these files byte for byte.
Usage: mkseed.py OUTDIR   (prints the number of messages written)
"""
import base64
import hashlib
import os
import sys

CRLF = "\r\n"


def msg(headers, body_lines):
    """Join header and body lines with CRLF; the message ends with CRLF."""
    return (CRLF.join(headers) + CRLF + CRLF + CRLF.join(body_lines) + CRLF).encode("utf-8")


def det_bytes(n):
    """n deterministic pseudo-random bytes (SHA-256 in counter mode)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"mailgate-harness-seed-%d" % i).digest()
        i += 1
    return bytes(out[:n])


def messages():
    yield "01-plain", msg([
        "Return-Path: <carol@example.test>",
        "From: Carol Sender <carol@example.test>",
        "To: Alice <alice@example.test>",
        "Subject: Hello from the harness",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        "Message-ID: <seed-01@harness.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ], ["Hi,", "", "this is a short plain-text seed message.", "", "-- ", "Carol"])

    yield "02-headers", msg([
        "From: \"Dave, the Reply-Tester\" <dave@example.test>",
        "Sender: list-bounces@lists.example.test",
        "Reply-To: replies@example.test",
        "To: alice@example.test, bob@example.test,",
        "  \"Eve Example\" <eve@example.test>",
        "Cc: Frank <frank@example.test>",
        "Subject: A folded subject line that goes on for quite a while so that",
        " it has to be continued on a second line",
        "Date: Tue, 02 Jan 2024 11:30:15 +0100",
        "Message-ID: <seed-02@harness.example.test>",
        "In-Reply-To: <seed-01@harness.example.test>",
        "References: <seed-01@harness.example.test>",
        "List-Id: Harness list <harness.lists.example.test>",
        "X-Priority: 1",
        "X-Harness-Tab:\tvalue after a tab",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii; format=flowed",
    ], ["A reply with many headers, a folded Subject and several recipients."])

    yield "03-multipart", msg([
        "From: Newsletter <news@example.test>",
        "To: alice@example.test",
        "Subject: Multipart alternative",
        "Date: Wed, 03 Jan 2024 08:00:00 -0500",
        "Message-ID: <seed-03@harness.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: multipart/alternative; boundary=\"=_harness_alt\"",
    ], [
        "This is a multi-part message in MIME format.",
        "",
        "--=_harness_alt",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "Plain part.",
        "",
        "--=_harness_alt",
        "Content-Type: text/html; charset=us-ascii",
        "",
        "<html><body><p>HTML <b>part</b>.</p></body></html>",
        "",
        "--=_harness_alt--",
    ])

    yield "04-qp", msg([
        "From: =?UTF-8?Q?Gr=C3=A9goire?= <gregoire@example.test>",
        "To: Alice <alice@example.test>",
        "Subject: =?UTF-8?B?RW5jb2RlZCB3b3JkOiDDqXTDqQ==?=",
        "Date: Thu, 04 Jan 2024 23:59:59 +0000",
        "Message-ID: <seed-04@harness.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
    ], ["Quoted-printable body: caf=C3=A9, na=C3=AFve, a soft line =", "break."])

    yield "05-tiny", msg([
        "From: bot@example.test",
        "To: alice@example.test",
        "Subject: tiny",
        "Date: Fri, 05 Jan 2024 00:00:00 +0000",
        "Message-ID: <seed-05@harness.example.test>",
    ], ["x"])

    # Lines starting with "." must be dot-stuffed by POP3 RETR/TOP.
    yield "06-dots", msg([
        "From: Dotty <dotty@example.test>",
        "To: alice@example.test",
        "Subject: Lines that start with a dot",
        "Date: Sat, 06 Jan 2024 12:00:00 +0000",
        "Message-ID: <seed-06@harness.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ], [
        "The next line is a single dot:",
        ".",
        ".. two dots",
        ".leading dot",
        "...",
        "The previous line was three dots; the message goes on after them.",
        ". dot space",
    ])

    # 8-bit UTF-8 body (no transfer encoding).
    yield "07-utf8", msg([
        "From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.test>",
        "To: alice@example.test",
        "Subject: =?UTF-8?B?R3LDvMOfZSDwn5Ks?=",
        "Date: Sun, 07 Jan 2024 09:15:00 +0200",
        "Message-ID: <seed-07@harness.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ], ["Grüße aus Köln!", "日本語のテキスト。", "Emoji: 📬 ✉️", "Ελληνικά, русский, עברית."])

    # ~3 MiB message with a base64 attachment.
    payload = det_bytes(2_300_000)
    b64 = base64.b64encode(payload).decode("ascii")
    lines = [b64[i:i + 76] for i in range(0, len(b64), 76)]
    yield "08-large", msg([
        "From: Archive <archive@example.test>",
        "To: alice@example.test",
        "Subject: Large message with attachment",
        "Date: Mon, 08 Jan 2024 18:45:00 +0000",
        "Message-ID: <seed-08@harness.example.test>",
        f"X-Attachment-SHA256: {hashlib.sha256(payload).hexdigest()}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/mixed; boundary=\"=_harness_mixed\"",
    ], [
        "--=_harness_mixed",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "See the attached file.",
        "",
        "--=_harness_mixed",
        "Content-Type: application/octet-stream; name=\"blob.bin\"",
        "Content-Disposition: attachment; filename=\"blob.bin\"",
        "Content-Transfer-Encoding: base64",
        "",
        *lines,
        "",
        "--=_harness_mixed--",
    ])


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: mkseed.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    n = 0
    for name, data in messages():
        with open(os.path.join(out, f"{name}.eml"), "wb") as f:
            f.write(data)
        n += 1
    print(n)


if __name__ == "__main__":
    main()
