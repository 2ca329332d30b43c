"""The write hooks of every repository (app/fhir/repository.py RepositoryFactory): the domain
rules that run inside each write's transaction, whoever writes (API, workers, CLI)."""

from __future__ import annotations

from app.casework.goal_status import GoalStatusHooks
from app.casework.referral_metrics import ReferralVersionHooks
from app.fhir.repository import WriteHook
from app.referrals.hooks import DirectoryHooks, ReferralHooks
from app.settings import Settings
from app.subscriptions.hooks import SubscriptionHooks


def write_hooks(settings: Settings) -> tuple[WriteHook, ...]:
    return (
        ReferralHooks(settings),
        DirectoryHooks(),
        SubscriptionHooks(settings),
        GoalStatusHooks(settings),
        ReferralVersionHooks(),
    )
