"""The sign-in pages of /auth/authorize: plain HTML and one stylesheet, no JavaScript.

Accessibility (WCAG 2.1 AA): one ``<h1>`` per page and a ``<main>`` landmark, every input with
a ``<label>``, related inputs grouped in a ``<fieldset>`` with a ``<legend>``, errors in a
``role="alert"`` region that the inputs point to with ``aria-describedby``, the natural tab
order (no ``tabindex``), ``autocomplete`` hints for password managers, visible focus outlines
and enough contrast (authorize.css). Every value shown is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from app.auth.users import CaseloadPatient

STYLESHEET_PATH = "/auth/authorize/style.css"

STYLESHEET = """\
:root { color-scheme: light; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
body { margin: 0; background: #f4f6f8; color: #1a1a1a; line-height: 1.5; }
main { max-width: 34rem; margin: 2rem auto; padding: 1.5rem 2rem; background: #fff;
       border: 1px solid #c9d1d9; border-radius: 8px; }
h1 { font-size: 1.5rem; margin-top: 0; }
label { display: block; font-weight: 600; margin-top: 1rem; }
input[type=text], input[type=password] { width: 100%; box-sizing: border-box; font-size: 1rem;
       padding: 0.6rem; border: 1px solid #57606a; border-radius: 4px; }
fieldset { border: 1px solid #c9d1d9; border-radius: 4px; margin: 1rem 0; padding: 0.5rem 1rem; }
legend { font-weight: 600; padding: 0 0.25rem; }
.choice { display: flex; gap: 0.5rem; align-items: baseline; margin: 0.5rem 0; }
.choice label { display: inline; font-weight: normal; margin: 0; }
ul.scopes { padding-left: 1.2rem; }
ul.scopes code { font-size: 0.9rem; background: #eef1f4; padding: 0 0.25rem; border-radius: 3px; }
button { font-size: 1rem; padding: 0.6rem 1.2rem; margin: 1rem 0.5rem 0 0; border-radius: 4px;
         border: 1px solid #0b4f9c; background: #0b5cad; color: #fff; cursor: pointer; }
button.secondary { background: #fff; color: #0b4f9c; }
:focus-visible { outline: 3px solid #b35900; outline-offset: 2px; }
.alert { border: 2px solid #a40e26; background: #fff0f0; color: #6e0a1a; padding: 0.75rem;
         border-radius: 4px; }
.note { color: #444c56; }
"""


@dataclass(frozen=True)
class FlowFields:
    """The hidden fields every form of one authorization flow posts back."""

    flow_id: str
    csrf_token: str

    def html(self) -> str:
        return (
            f'<input type="hidden" name="flow" value="{escape(self.flow_id)}">'
            f'<input type="hidden" name="csrf_token" value="{escape(self.csrf_token)}">'
        )


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{escape(title)} - carecoord</title>"
        f'<link rel="stylesheet" href="{STYLESHEET_PATH}">'
        f"</head><body><main>{body}</main></body></html>\n"
    )


def _alert(message: str | None) -> str:
    if not message:
        return ""
    return f'<div class="alert" role="alert" id="form-error">{escape(message)}</div>'


def login_page(
    fields: FlowFields,
    *,
    client_name: str,
    error: str | None = None,
    username: str = "",
    upstream_name: str | None = None,
) -> str:
    described = ' aria-describedby="form-error"' if error else ""
    invalid = ' aria-invalid="true"' if error else ""
    body = (
        "<h1>Sign in</h1>"
        f'<p class="note">to continue to <strong>{escape(client_name)}</strong></p>'
        f"{_alert(error)}"
        '<form method="post" action="/auth/authorize/login">'
        f"{fields.html()}"
        '<label for="username">Username</label>'
        f'<input type="text" id="username" name="username" autocomplete="username" required'
        f' autocapitalize="none" spellcheck="false" value="{escape(username)}"{described}{invalid}>'
        '<label for="password">Password</label>'
        f'<input type="password" id="password" name="password" autocomplete="current-password" required'
        f"{described}{invalid}>"
        '<button type="submit">Sign in</button>'
        "</form>"
    )
    if upstream_name:
        body += (
            '<form method="post" action="/auth/authorize/upstream">'
            f"{fields.html()}"
            f'<button type="submit" class="secondary">Sign in with {escape(upstream_name)}</button>'
            "</form>"
        )
    return _page("Sign in", body)


def patient_page(
    fields: FlowFields, *, client_name: str, patients: Sequence[CaseloadPatient], error: str | None = None
) -> str:
    if patients:
        choices = "".join(
            '<div class="choice">'
            f'<input type="radio" name="patient" id="patient-{index}" value="{escape(patient.patient_id)}"'
            f"{' required' if index == 0 else ''}>"
            f'<label for="patient-{index}">{escape(patient.name)}'
            f"{f', born {escape(patient.birth_date)}' if patient.birth_date else ''}"
            f' <span class="note">(Patient/{escape(patient.patient_id)})</span></label>'
            "</div>"
            for index, patient in enumerate(patients)
        )
        form = (
            '<form method="post" action="/auth/authorize/patient">'
            f"{fields.html()}"
            f"<fieldset><legend>Your patients</legend>{choices}</fieldset>"
            '<button type="submit">Continue</button>'
            "</form>"
        )
    else:
        form = (
            '<p class="note">There is no one in your caseload (active care teams and episodes of care).</p>'
        )
    cancel = (
        '<form method="post" action="/auth/authorize/consent">'
        f"{fields.html()}"
        '<button type="submit" class="secondary" name="decision" value="deny">Cancel</button>'
        "</form>"
    )
    body = (
        "<h1>Choose a patient</h1>"
        f'<p class="note"><strong>{escape(client_name)}</strong> will work with the record of the'
        " patient you choose.</p>"
        f"{_alert(error)}{form}{cancel}"
    )
    return _page("Choose a patient", body)


def consent_page(
    fields: FlowFields,
    *,
    client_name: str,
    scopes: Sequence[tuple[str, str]],
    user_display: str,
    patient_display: str | None,
) -> str:
    items = "".join(
        f"<li><span>{escape(words)}</span> <code>{escape(scope)}</code></li>" for scope, words in scopes
    )
    patient = (
        f"<p>For the record of <strong>{escape(patient_display)}</strong>.</p>" if patient_display else ""
    )
    body = (
        f"<h1>Allow {escape(client_name)}?</h1>"
        f'<p class="note">Signed in as {escape(user_display)}.</p>'
        f"{patient}"
        '<form method="post" action="/auth/authorize/consent">'
        f"{fields.html()}"
        f'<fieldset><legend>{escape(client_name)} asks to</legend><ul class="scopes">{items}</ul></fieldset>'
        '<button type="submit" name="decision" value="approve">Allow</button>'
        '<button type="submit" class="secondary" name="decision" value="deny">Deny</button>'
        "</form>"
    )
    return _page(f"Allow {client_name}?", body)


def error_page(title: str, message: str) -> str:
    body = f"<h1>{escape(title)}</h1>{_alert(message)}"
    return _page(title, body)
