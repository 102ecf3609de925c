"""Vectorised actors (`distributed.envs_per_actor`): one actor stepping N envs writes
exactly the items N single-env actors with the same seeds write (frames, n-step
returns, discounts, actions, episode boundaries), explores with each env's own
Ape-X ε, splits its share exactly, and is today's actor when N = 1.
"""
import jax
import numpy as np
import pytest
import reverb

from conftest import CONFIGS
from eosrl.agents import networks, replay
from eosrl.agents.actor import Actor, VectorActor, linear_epsilon
from eosrl.launch.builder import Builder, actor_seed
from eosrl.agents.config import AgentConfig, ConfigError
from eosrl.launch.config import load_config
from eosrl.envs.factory import make_env

NUM_ACTIONS = 3
FRAME = (2, 2)
REWARDS = [2.0, -0.5, 0.0, 1.5, -3.0, 0.25]


class CountingEnv:
    """Episodes of the lengths `lengths` (cycled; even-numbered ones terminate, odd ones
    are truncated), frames that encode (tag, episode, step), stacked on the last axis with
    the reset frame repeated (as the Atari factory does), unclipped rewards, and life
    losses. Records its reset seeds and the actions it was given."""

    def __init__(self, tag: int, lengths, stack: int):
        self.tag, self.lengths, self.stack = tag, lengths, stack
        self.episode, self.t, self.done = -1, 0, True
        self.reset_seeds, self.actions = [], []

    def _frame(self, t):
        return np.array([[self.tag, self.episode % 256], [t, (7 * self.tag + t) % 251]], np.uint8)

    def _obs(self):
        frames = [self._frame(max(0, t)) for t in range(self.t - self.stack + 1, self.t + 1)]
        return np.stack(frames, axis=-1) if self.stack > 1 else frames[0]

    def reset(self, seed=None):
        self.episode, self.t, self.done = self.episode + 1, 0, False
        self.reset_seeds.append(seed)
        return self._obs(), {"life_loss": False}

    def step(self, action):
        assert not self.done, "step after the episode ended, without a reset"
        self.actions.append(action)
        self.t += 1
        ended = self.t == self.lengths[self.episode % len(self.lengths)]
        terminated, truncated = ended and self.episode % 2 == 0, ended and self.episode % 2 == 1
        self.done = ended
        reward = REWARDS[(self.t + self.tag) % len(REWARDS)]
        life_loss = (self.t + self.tag) % 4 == 2 and not ended
        return self._obs(), reward, terminated, truncated, {"life_loss": life_loss}


# Episode lengths per env: 1-step episodes, and lengths below and above n_step.
LENGTHS = [[1, 4, 2, 6, 3], [5, 1, 1, 3], [2, 7, 1, 4, 1], [3, 3, 8]]
N_STEP, GAMMA = 3, 0.9


def _epsilons(envs):
    """Per-env ε: greedy, uniform, a mix, and a schedule over the env's own steps."""
    options = [lambda step: 1.0, lambda step: 0.0, lambda step: 0.5, linear_epsilon(1.0, 0.0, 12)]
    return [options[i % len(options)] for i in range(envs)]


def _layout(stack):
    return replay.ItemLayout(FRAME, np.uint8, stack, N_STEP)


def _server(stack, tables):
    signature = _layout(stack).signature()
    server = reverb.Server([reverb.Table.queue(name, 100_000, signature=signature) for name in tables])
    return server, reverb.Client(f"localhost:{server.port}")


def _items(client, table, stack):
    """Every item of the queue `table`, in the order it was inserted, as dicts of its raw
    fields and their readable view (obs, next_obs, action, reward, discount, steps)."""
    count = replay.table_size(client, table)
    rows = [sample.data for sample in client.sample(table, num_samples=count, emit_timesteps=False)]
    items = [{key: np.asarray(row[i]) for i, key in enumerate(replay.ITEM_FIELDS)} for row in rows]
    return [{**item, **_layout(stack).unpacked(item)} for item in items]


def _assert_same_items(got, want):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        for key in replay.ITEM_FIELDS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"item {k}, {key}")


def _network(stack):
    obs_shape = FRAME + (stack,) if stack > 1 else FRAME
    return networks.make_network(AgentConfig(kind="dqn", network="mlp", hidden_sizes=[8]), "gym",
                                 obs_shape, NUM_ACTIONS)


@pytest.mark.parametrize("envs,stack", [(3, 3), (4, 1), (1, 3)])
def test_vector_actor_writes_what_single_env_actors_with_its_seeds_write(envs, stack):
    """Breaks if an env's items differ from those of the single-env actor with its seed: a
    frame of another env or episode in a stack, an n-step return, discount or action that
    differs, a lost or extra item at an episode boundary, exploration keys or ε schedules
    that are not each env's own, or a last partial step that steps the wrong envs."""
    agent, network = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[8]), _network(stack)
    params, net_state = network.init(jax.random.PRNGKey(1))
    seeds = [actor_seed(0, 1, 0, i, envs) for i in range(envs)]
    rounds, partial = 14, max(1, envs - 1)  # then one last step of the first envs only
    server, client = _server(stack, ["vector"] + [f"single_{i}" for i in range(envs)])
    try:
        vector_envs = [CountingEnv(i, LENGTHS[i], stack) for i in range(envs)]
        adders = replay.TransitionAdder.for_envs(client, envs, N_STEP, GAMMA, stack, table="vector")
        vector = VectorActor(vector_envs, network, agent, adders, seeds, clip_rewards=True,
                             epsilons=_epsilons(envs))
        vector.update_params(params, net_state)
        ended = []
        for _ in range(rounds):
            ended += vector.step()
        ended += vector.step(partial)
        assert vector.steps == rounds * envs + partial
        adders[0].flush()

        singles = []
        for i in range(envs):
            env = CountingEnv(i, LENGTHS[i], stack)
            adder = replay.TransitionAdder(client, N_STEP, GAMMA, stack, table=f"single_{i}")
            actor = Actor(env, network, agent, adder, seed=seeds[i], clip_rewards=True,
                          epsilon=_epsilons(envs)[i])
            actor.update_params(params, net_state)
            for _ in range(rounds + (1 if i < partial else 0)):
                actor.step()
            adder.flush()
            singles.append((env, actor))

        items = _items(client, "vector", stack)
        for i, (env, actor) in enumerate(singles):
            assert vector_envs[i].actions == env.actions
            assert vector_envs[i].reset_seeds == env.reset_seeds == [seeds[i]] + [None] * (len(env.reset_seeds) - 1)
            assert vector.stats[i].returns == actor.stats.returns  # raw returns
            assert vector.stats[i].lengths == actor.stats.lengths
            assert ended.count(i) == len(actor.stats.lengths)
            mine = [item for item in items if item["obs"][0, 0, 0] == i]  # the frame's env tag
            reference = _items(client, f"single_{i}", stack)
            assert len(reference) > 2 * len(actor.stats.lengths)  # several episodes of several items
            _assert_same_items(mine, reference)
        assert {int(item["obs"][0, 0, 0]) for item in items} == set(range(envs))  # no item of no env
        discounts = [float(item["discount"]) for item in items]
        assert any(d == 0.0 for d in discounts)  # terminals and life losses
        assert any(0.0 < d < GAMMA ** N_STEP + 1e-6 for d in discounts)
    finally:
        server.stop()


def test_interleaved_envs_never_mix_frames_in_a_stack():
    """Breaks if a stack shows a frame of another env or episode, or a step out of order:
    the envs' rows interleave in one writer, and Reverb reads an item's cells in one chunk
    as one slice from the first, so an env's frames need a column of their own. Episodes of
    one to nine steps, so resets (whole stacks of frames) interleave with steps, and enough
    steps for the writer's chunks to grow past one row."""
    envs, stack = 8, 4
    agent, network = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[8]), _network(stack)
    params, net_state = network.init(jax.random.PRNGKey(1))
    server, client = _server(stack, ["vector"])
    try:
        vector_envs = [CountingEnv(i, [1, 2] if i % 2 else [2, 1, 9], stack) for i in range(envs)]
        adders = replay.TransitionAdder.for_envs(client, envs, N_STEP, GAMMA, stack, table="vector")
        vector = VectorActor(vector_envs, network, agent, adders, list(range(envs)), clip_rewards=False)
        vector.update_params(params, net_state)
        for _ in range(60):
            vector.step()
        adders[0].flush()
        items = _items(client, "vector", stack)
        assert len(items) > 300
        for item in items:  # frames [stack, 2, 2]: (tag, episode) on the first row, the step below
            tag, episode, start = item["obs"][-1, 0, 0], item["obs"][-1, 0, 1], item["obs"][-1, 1, 0]
            for key in ("obs", "next_obs"):
                frames = item[key]
                assert (frames[:, 0, 0] == tag).all() and (frames[:, 0, 1] == episode).all()
                t = int(frames[-1, 1, 0])
                assert list(frames[:, 1, 0]) == [max(0, t - stack + 1 + k) for k in range(stack)]
            assert 0 < item["next_obs"][-1, 1, 0] - start <= N_STEP
    finally:
        server.stop()


# ----------------------------------------------------------------------------
# Seeds and exploration of a distributed actor's envs.

def test_env_seeds_and_apex_epsilons_are_those_of_the_single_env_actors(monkeypatch):
    """Breaks if env i of actor a is not seeded and does not explore as single-env actor
    a·N + i of all actors' envs, i.e. if Ape-X ε is spread over actors instead of envs."""
    config = load_config(CONFIGS / "dqn_cartpole.yaml",
                         ["distributed.actor_epsilon=apex", "distributed.envs_per_actor=4"])
    single = load_config(CONFIGS / "dqn_cartpole.yaml", ["distributed.actor_epsilon=apex"])
    made = []
    import eosrl.launch.builder as builder_module
    monkeypatch.setattr(builder_module, "make_env", lambda env, seed, training=True: made.append(seed) or seed)
    monkeypatch.setattr(builder_module, "VectorActor", lambda envs, *args, **kwargs: (envs, args, kwargs))
    builder = Builder(config)
    all_epsilons, all_seeds = [], []
    for actor_id in range(2):
        envs, args, kwargs = builder.make_vector_actor([None] * 4, actor_id, num_actors=2, start_step=80)
        assert envs == args[3] == made[-4:]  # each env is made with the seed it explores with
        all_seeds += envs
        all_epsilons += [epsilon(12_345) for epsilon in kwargs["epsilons"]]
    reference = Builder(single)
    assert all_epsilons == pytest.approx([reference.epsilon(i, 8)(0) for i in range(8)], rel=1e-12)
    assert all_epsilons == pytest.approx([0.4 ** (1 + 7 * i / 7) for i in range(8)], rel=1e-12)
    assert all_seeds == [actor_seed(config.run.seed, i, 80) for i in range(8)]
    assert len(set(all_seeds)) == 8
    with pytest.raises(ValueError, match="envs_per_actor"):
        builder.make_vector_actor([None] * 3, 0, num_actors=2)


def test_one_env_per_actor_keeps_todays_seeds_and_epsilons():
    """Breaks if N = 1 (the default) changes an actor's seed or its ε (its items are
    those of `Actor`: the (1, 3) case above)."""
    config = load_config(CONFIGS / "dqn_cartpole.yaml", ["distributed.actor_epsilon=apex"])
    assert config.distributed.envs_per_actor == 1
    for actor_id, start in [(0, 0), (3, 500)]:
        assert actor_seed(7, actor_id, start) == 7 + 1000 * (actor_id + 1) + start
    actor = Builder(config).make_vector_actor([None], 2, num_actors=5, start_step=40)
    assert actor.num_envs == 1
    first_obs, _ = make_env(config.env, config.run.seed + 1000 * 3 + 40).reset()
    np.testing.assert_array_equal(actor.streams[0].env.reset()[0], first_obs)  # seeded as before
    assert actor.epsilon(0) == pytest.approx(0.4 ** (1 + 7 * 2 / 4))
    schedule = Builder(load_config(CONFIGS / "dqn_cartpole.yaml")).make_vector_actor([None], 0, 1)
    schedule.steps = 40  # a resumed share: the schedule continues from its step count
    a = config.agent
    assert schedule.epsilon(0) == pytest.approx(linear_epsilon(a.epsilon_start, a.epsilon_end,
                                                                a.epsilon_decay_steps)(40))


def test_envs_per_actor_below_one_is_a_config_error_naming_the_field():
    """Breaks if 0, a negative or a fractional count of envs gets past the config check,
    or its error is not one line that names the field."""
    for value in (0, -2):
        with pytest.raises(ConfigError, match="distributed.envs_per_actor") as err:
            load_config(CONFIGS / "dqn_cartpole.yaml", [f"distributed.envs_per_actor={value}"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="distributed.envs_per_actor"):
        load_config(CONFIGS / "dqn_cartpole.yaml", ["distributed.envs_per_actor=2.5"])


# ----------------------------------------------------------------------------
# The actor role.

def test_run_actor_splits_its_share_exactly_and_records_each_envs_episodes(tmp_path):
    """Breaks if a share that is not a multiple of N is over- or under-stepped, or if an
    episode's record lacks its env, its own ε, or the env-step count of all the envs."""
    from eosrl.launch.channels import ParamsChannel
    from eosrl.launch.roles import run_actor
    from eosrl.launch.rundir import read_metrics
    config = load_config(CONFIGS / "dqn_cartpole.yaml",
                         ["distributed.envs_per_actor=3", "distributed.param_refresh_steps=10", "agent.n_step=1"])
    builder = Builder(config)
    server = replay.start_server([builder.make_replay_table(rate_limited=False), replay.params_table()])
    try:
        client = reverb.Client(f"localhost:{server.port}")
        params, net_state = builder.network.init(jax.random.PRNGKey(0))
        ParamsChannel(client, (params, net_state)).publish(params, net_state, 5, 0)
        steps = 200
        assert run_actor(config, f"localhost:{server.port}", 1, 2, steps, tmp_path) == 0
        assert replay.table_size(client) == steps  # n_step 1: one item per env step
        records = list(read_metrics(tmp_path / "metrics.jsonl", "actor"))
        assert {r["env"] for r in records} == {0, 1, 2} and {r["actor"] for r in records} == {1}
        assert all(r["step"] == 5 for r in records)  # the learner step of the params it acts with
        assert all(r["env_steps"] % 3 == 0 for r in records if r["env_steps"] < steps)
        a = config.agent
        for r in records:  # ε at the env's own step count: a third of the actor's
            assert r["epsilon"] == pytest.approx(linear_epsilon(a.epsilon_start, a.epsilon_end,
                                                                a.epsilon_decay_steps)(r["env_steps"] // 3))
        for env, per_env in enumerate((67, 67, 66)):  # 200 = 3 × 66 + a last step of two envs
            mine = [r for r in records if r["env"] == env]
            assert sum(r["episode_length"] for r in mine) <= per_env
            assert sum(r["episode_length"] for r in mine) > per_env - 40  # CartPole's random episodes are short
    finally:
        server.stop()
