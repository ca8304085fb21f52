#!/usr/bin/env python3
"""Approve an RFC 8628 device authorization at the harness's oidc-provider
without a browser: play the user who opens the verification page, confirms the
user code and logs in as EMAIL. The polling client then gets its tokens.

Usage:
  device.py --issuer URL --user-code CODE --user EMAIL [--verification-uri URL]

Steps (each page is oidc-provider's own): GET the verification page
(default ISSUER/device) with ?user_code=CODE, submit its form and then the
"Confirm Device" form (each carries the session's xsrf value), follow the
redirects to /interaction/UID, adding ?login_hint=EMAIL there (the harness's
interaction route logs in as that account, which also works when the device
authorization request had no login_hint), and stop at the "Sign-in Success"
page. Prints one line on stdout and exits 0 on success. Exits 1 with a message
on stderr otherwise, e.g. for an unknown, expired or already used user code,
or for --user deny@example.test (the polling client then gets access_denied).
Python 3 standard library only.
"""
import argparse
import html
import html.parser
import http.cookiejar
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

MAX_STEPS = 20


def fail(msg):
    print(f"device.py: {msg}", file=sys.stderr)
    sys.exit(1)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand 3xx responses back to us instead of following them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Page(html.parser.HTMLParser):
    """The bits of an HTML page we need: title, forms (action + input fields),
    and error lines (<p class="red"> or <pre>...</pre> on oidc-provider pages)."""

    def __init__(self, text):
        super().__init__()
        self.title, self.forms, self.errors = "", [], []
        self._in, self._form = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._form = {"action": a.get("action", ""), "method": (a.get("method") or "get").lower(),
                          "fields": {}}
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            self._form["fields"][a["name"]] = a.get("value") or ""
        elif tag == "title" or (tag == "p" and a.get("class") == "red") or tag == "pre":
            self._in = tag
            if tag != "title":
                self.errors.append("")

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None
        elif tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in:
            self.errors[-1] += data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--user-code", required=True, help="user_code from the device authorization response")
    ap.add_argument("--user", required=True, help="account to log in as, e.g. alice@example.test")
    ap.add_argument("--verification-uri", help="default: ISSUER/device")
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args()

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect())
    url = args.verification_uri or f"{args.issuer.rstrip('/')}/device"
    if "user_code=" not in urllib.parse.urlsplit(url).query:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"user_code": args.user_code})
    data = None  # None: GET, else the form to POST

    for _ in range(MAX_STEPS):
        parts = urllib.parse.urlsplit(url)
        if data is None and re.fullmatch(r"/interaction/[^/]+", parts.path) and "login_hint=" not in parts.query:
            # The "login form": tell the interaction route who we are.
            url += ("&" if parts.query else "?") + urllib.parse.urlencode({"login_hint": args.user})
        req = urllib.request.Request(url, data=None if data is None else urllib.parse.urlencode(data).encode())
        try:
            resp = opener.open(req, timeout=args.timeout)
            status, headers, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        except urllib.error.URLError as e:
            fail(f"{req.get_method()} {url} failed: {e}")
        if status in (301, 302, 303, 307, 308) and headers.get("Location"):
            url, data = urllib.parse.urljoin(url, headers["Location"]), None
            continue
        page = Page(body.decode("utf-8", "replace"))
        errors = [" ".join(html.unescape(e).split()) for e in page.errors if e.strip()]
        where = f"{req.get_method()} {parts.path} -> HTTP {status}"
        if status == 200 and page.title.strip() == "Sign-in Success":
            print(f"device.py: user code {args.user_code} approved as {args.user}")
            return
        if errors:
            fail(f"{where}: {'; '.join(errors)}")
        forms = [f for f in page.forms if f["method"] == "post" and "xsrf" in f["fields"]]
        if status != 200 or not forms:
            fail(f"{where}: unexpected page {page.title.strip()!r}")
        # Submit oidc-provider's form: the user code (auto-submitted) form,
        # or the "Confirm Device" one (it carries confirm=yes).
        form = forms[0]
        fields = dict(form["fields"])
        if not fields.get("user_code"):
            fields["user_code"] = args.user_code
        url, data = urllib.parse.urljoin(url, form["action"]), fields
    fail(f"no 'Sign-in Success' page after {MAX_STEPS} steps")


if __name__ == "__main__":
    main()
