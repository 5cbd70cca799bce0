"""
What the operator lets clients choose for a turn, and what a turn gets when its client is silent.

A request outside the policy is refused with 403 naming the field and the option that forbids it, before
anything runs; the operator's defaults are filled in here, so what runs is exactly what L{TurnPolicy.apply}
returns.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from claudesrv.command import ClaudeRequest
from claudesrv.errors import ApiError

BYPASS = "bypassPermissions"


@dataclass
class TurnPolicy:
    skip_permissions: str = "allow"  # allow | deny: dangerously-skip-permissions and permission_mode bypass
    as_root: bool = False
    sandboxed: bool = False
    approvals: str = "allow"  # allow | deny: "approvals": true
    allow_models: tuple[str, ...] = ()  # glob patterns; none: any model
    default_model: str | None = None
    max_budget_usd: float | None = None  # the most a turn may ask for, and what a silent one gets
    max_turns_limit: int | None = None  # likewise for max_turns
    allow_system_prompt: str = "yes"  # yes | append | no

    def apply(self, request: ClaudeRequest) -> ClaudeRequest:
        """The turn as it will run; raises L{ApiError} 403 when the request asks for what is not allowed."""
        options = request.options
        mode = request.permission_mode
        if options.skip_permissions or mode == BYPASS:
            self._check_skip(request)
            options = dataclasses.replace(options, skip_permissions=True)
        if request.approvals and self.approvals == "deny":
            raise ApiError(403, "approvals_denied", "this server does not ask people about tools (--approvals deny); "
                                                    "pre-approve them with allowedTools", "approvals")
        model = request.model
        if model is not None and self.allow_models and not any(
                fnmatch.fnmatchcase(model, pattern) for pattern in self.allow_models):
            raise ApiError(403, "model_not_allowed", f"this server does not offer the model {model!r} "
                                                     f"(--allow-model {' '.join(self.allow_models)})", "model")
        budget = options.max_budget_usd
        if budget is not None and self.max_budget_usd is not None and budget > self.max_budget_usd:
            raise ApiError(403, "budget_over_limit", f"max_budget_usd may be at most {self.max_budget_usd:g} here "
                                                     "(--max-budget-usd)", "max_budget_usd")
        turns = options.max_turns
        if turns is not None and self.max_turns_limit is not None and turns > self.max_turns_limit:
            raise ApiError(403, "max_turns_over_limit", f"max_turns may be at most {self.max_turns_limit} here "
                                                        "(--max-turns-limit)", "max_turns")
        if options.system_prompt is not None and self.allow_system_prompt != "yes":
            raise ApiError(403, "system_prompt_denied", "this server does not let a request replace the system "
                                                        f"prompt (--allow-system-prompt {self.allow_system_prompt})",
                           "system_prompt")
        if options.append_system_prompt is not None and self.allow_system_prompt == "no":
            raise ApiError(403, "system_prompt_denied", "this server does not let a request change the system "
                                                        "prompt (--allow-system-prompt no)", "append_system_prompt")
        options = dataclasses.replace(
            options, max_budget_usd=budget if budget is not None else self.max_budget_usd,
            max_turns=turns if turns is not None else self.max_turns_limit)
        return dataclasses.replace(
            request, options=options, model=model if model is not None else self.default_model,
            permission_mode=mode or (BYPASS if options.skip_permissions else "default"))

    def defaults(self) -> ClaudeRequest:
        """A turn that asks for nothing: what spares are started with, so that such turns can take them."""
        return self.apply(ClaudeRequest(prompt=""))

    def _check_skip(self, request: ClaudeRequest) -> None:
        field = "dangerously-skip-permissions" if request.options.skip_permissions else "permission_mode"
        if self.skip_permissions == "deny":
            raise ApiError(403, "skip_permissions_denied",
                           "this server does not allow dangerously-skip-permissions or bypassPermissions "
                           "(--skip-permissions deny)", field)
        if self.as_root and not self.sandboxed:
            raise ApiError(403, "skip_permissions_as_root",
                           "the daemon runs as root, and the Claude CLI refuses --dangerously-skip-permissions "
                           "as root; run the daemon as another user, or, only inside a container or VM, start it "
                           "with --sandboxed", field)
