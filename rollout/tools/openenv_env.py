"""The built-in `openenv` environment: an environment written for OpenEnv (meta-pytorch's
`openenv-core`, `openenv.core.env_server.interfaces.Environment`) runs in multi-turn rollouts as it is.

    rollout:
      tools:
        environment: openenv
        kwargs: {environment: "my_env.server.my_environment:MyEnvironment"}
    rewards:
      functions: [{name: environment, weight: 1.0}]     # the rewards the environment gives

Each rollout gets its own instance of the environment class (OpenEnv environments keep their
episode in the instance), made with `init` as keyword arguments and reset with `reset` (plus the
data row's fields named in `example_fields`). The reset observation is not shown (the prompt comes
from the data row). A policy turn ends on a stop string (`stop`, default ``</action>``); the text
after the turn's last `action_open` (default ``<action>``; the whole turn when there is none), stop
string removed, fills the action's one text field (`action_field`, found from the action model when
it has exactly one required `str` field), and the action model is the type of `step`'s `action`
parameter (or `action`, ``module:Class``). The observation comes back as text: its `observation_fields`
(default: every field but `done`, `reward` and `metadata`; one field as its value, several as
``name: value`` lines) inside `observation_open` / `observation_close`. `done` ends the rollout
(its text is not fed); each `reward` adds to the rollout's environment reward, which the built-in
reward `environment` returns. An action the model cannot build (a validation error) comes back as
an error observation and the episode goes on.

The environment's own code is the user's code and runs in this process; the model's text only
ever fills a string field. `openenv` is imported only inside this module's functions.
"""

from __future__ import annotations

import inspect
import typing
import weakref
from dataclasses import dataclass
from typing import Any

from rollout.turns import Observation

OMITTED_FIELDS = ("done", "reward", "metadata")


class OpenEnvError(ValueError):
    """An `openenv` environment that cannot be set up (the message names the setting)."""


def _load_class(path: str):
    import importlib

    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise OpenEnvError(f"rollout.tools.kwargs: {path!r} is not 'package.module:ClassName'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OpenEnvError(f"rollout.tools.kwargs: cannot load {path!r}: {exc}") from exc


def _text_fields(model) -> list[str]:
    return [name for name, f in model.model_fields.items()
            if name not in OMITTED_FIELDS and f.annotation is str and f.is_required()]


@dataclass
class _Episode:
    env: Any  # this rollout's instance of the environment class


class OpenEnvTool:
    """An OpenEnv `Environment` class behind the multi-turn interface of `rollout.turns` (see the module
    docstring)."""

    def __init__(self, env_class, *, init: dict | None = None, reset: dict | None = None,
                 example_fields: tuple[str, ...] = (), action=None, action_field: str | None = None,
                 observation_fields: tuple[str, ...] | None = None, stop: tuple[str, ...] = ("</action>",),
                 action_open: str = "<action>", observation_open: str = "<observation>",
                 observation_close: str = "</observation>", timeout_s: float | None = None):
        from openenv.core.env_server.interfaces import Environment

        if not (isinstance(env_class, type) and issubclass(env_class, Environment)):
            raise OpenEnvError(f"rollout.tools.kwargs.environment: {env_class!r} is not an OpenEnv Environment class")
        if not stop:
            raise OpenEnvError("rollout.tools.kwargs.stop: an openenv environment needs a stop string ending each action")
        self.env_class, self.init, self.reset_kwargs = env_class, dict(init or {}), dict(reset or {})
        self.example_fields = tuple(example_fields)
        self.action_model = action if action is not None else self._action_model(env_class)
        fields = _text_fields(self.action_model)
        if action_field is None:
            if len(fields) != 1:
                raise OpenEnvError(f"rollout.tools.kwargs.action_field: {self.action_model.__name__} has "
                                   f"{len(fields)} required text fields ({fields}); name the one the policy's text fills")
            action_field = fields[0]
        elif action_field not in self.action_model.model_fields:
            raise OpenEnvError(f"rollout.tools.kwargs.action_field: {self.action_model.__name__} has no field "
                               f"{action_field!r}")
        self.action_field = action_field
        self.observation_fields = tuple(observation_fields) if observation_fields else None
        self.stop, self.action_open = tuple(stop), action_open
        self.observation_open, self.observation_close = observation_open, observation_close
        self.timeout_s = timeout_s

    @staticmethod
    def _action_model(env_class):
        try:
            hint = typing.get_type_hints(env_class.step).get("action")
        except Exception:  # noqa: BLE001 - unresolvable annotations: the recipe must name the model
            hint = None
        from pydantic import BaseModel

        if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
            raise OpenEnvError(f"rollout.tools.kwargs.action: {env_class.__name__}.step does not annotate its action "
                               "with a model class; name it ('package.module:ActionClass')")
        return hint

    def reset(self, example: dict) -> _Episode:
        env = self.env_class(**self.init)
        episode = _Episode(env)
        if callable(getattr(env, "close", None)):
            weakref.finalize(episode, env.close)  # the batch's episodes go, their instances close
        extra = {name: example[name] for name in self.example_fields if name in example}
        env.reset(**self.reset_kwargs, **extra)
        return episode

    def action_text(self, turn: str) -> str:
        """What of the policy's turn fills the action: after its last `action_open`, stop string removed."""
        for s in self.stop:
            if turn.endswith(s):
                turn = turn[: -len(s)]
                break
        start = turn.rfind(self.action_open) if self.action_open else -1
        return turn[start + len(self.action_open):] if start >= 0 else turn

    def render(self, obs) -> str:
        data = obs.model_dump()
        names = self.observation_fields or tuple(k for k in data if k not in OMITTED_FIELDS)
        if len(names) == 1:
            body = str(data.get(names[0], ""))
        else:
            body = "\n".join(f"{name}: {data.get(name)}" for name in names)
        return f"{self.observation_open}{body}{self.observation_close}"

    def step(self, turns: list[str], state: _Episode) -> Observation | None:
        from pydantic import ValidationError

        if not any(turns[-1].endswith(s) for s in self.stop):
            return None
        try:
            action = self.action_model(**{self.action_field: self.action_text(turns[-1])})
        except ValidationError as exc:
            first = exc.errors()[0]
            return Observation(f"{self.observation_open}invalid action: {first.get('msg', exc)}{self.observation_close}",
                               tool_call=True, status="error")
        kwargs = {"timeout_s": self.timeout_s} if self.timeout_s is not None else {}
        obs = state.env.step(action, **kwargs)
        reward = float(obs.reward) if obs.reward is not None else None
        return Observation(self.render(obs), tool_call=True, status="ok", reward=reward, done=bool(obs.done))

    def close(self) -> None:
        """Instances close with their episodes (`reset`)."""


def openenv_environment(environment: str, **kwargs) -> OpenEnvTool:
    """The `openenv` factory: `environment` is the Environment class as 'package.module:ClassName';
    the other keyword arguments are `OpenEnvTool`'s (`action` also as 'package.module:ClassName')."""
    try:
        import openenv  # noqa: F401
    except ImportError:
        raise OpenEnvError("rollout.tools.environment=openenv needs OpenEnv: pip install openenv-core") from None
    if isinstance(kwargs.get("action"), str):
        kwargs["action"] = _load_class(kwargs["action"])
    for key in ("stop", "example_fields", "observation_fields"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    unknown = set(kwargs) - set(inspect.signature(OpenEnvTool.__init__).parameters)
    if unknown:
        raise OpenEnvError(f"rollout.tools.kwargs: unknown key(s) {sorted(unknown)} for the openenv environment")
    return OpenEnvTool(_load_class(environment), **kwargs)
