#!/usr/bin/env python3
"""A legacy SMTP sender, played by Python's smtplib, for the gateway tests.

  smtp_client.py send --port P --mode ssl|starttls --cafile CA --user U
                 --password PW --auth plain|login --from F --to T [--to T2 ...]
                 --message FILE [--smtputf8] [--8bitmime]

connects (implicit TLS, or STARTTLS), logs in with AUTH PLAIN (initial
response) or AUTH LOGIN (in steps), sends FILE's bytes unchanged as one
message to every --to, and QUITs. It prints one JSON line:
{"login": "OK", "ehlo": [...], "sent": true}; a refused login or message
prints {"login": "NO"|"OK", "code": N, "error": "..."} and exits 0, so the
test can check the reply.
"""
import argparse
import json
import smtplib
import ssl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["send", "login"])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["ssl", "starttls"], default="ssl")
    p.add_argument("--cafile", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--auth", choices=["plain", "login"], default="plain")
    p.add_argument("--from", dest="sender")
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--message")
    p.add_argument("--smtputf8", action="store_true")
    p.add_argument("--8bitmime", dest="eightbit", action="store_true")
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.mode == "ssl":
        s = smtplib.SMTP_SSL(a.host, a.port, context=ctx, timeout=60)
    else:
        s = smtplib.SMTP(a.host, a.port, timeout=60)
        s.ehlo()
        s.starttls(context=ctx)
    out = {}
    try:
        s.ehlo()
        out["ehlo"] = sorted(s.esmtp_features.keys())
        s.user, s.password = a.user, a.password
        if a.auth == "plain":
            s.auth("PLAIN", s.auth_plain)
        else:
            s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        out["login"] = "OK"
    except smtplib.SMTPResponseException as e:
        print(json.dumps({"login": "NO", "code": e.smtp_code, "error": e.smtp_error.decode()}))
        return
    if a.command == "send":
        options = []
        if a.smtputf8:
            options.append("SMTPUTF8")
        if a.eightbit:
            options.append("BODY=8BITMIME")
        message = open(a.message, "rb").read()
        try:
            refused = s.sendmail(a.sender, a.to, message, mail_options=options)
            out["sent"] = not refused
        except smtplib.SMTPResponseException as e:
            out.update({"code": e.smtp_code, "error": e.smtp_error.decode()})
        except smtplib.SMTPRecipientsRefused as e:
            out.update({"error": str(e)})
    s.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
