"""The driver's torch threads follow the idle cores: a busy machine stalled 2 OpenMP threads 3x behind 1."""

import torch

from facediff.threads import DEFAULT_THREADS, busy_cores_note, idle_cores, threads_for_idle_cores


def test_driver_threads_follow_the_idle_cores_within_one_and_the_default():
    try:
        assert threads_for_idle_cores(idle=0.0) == 1 and torch.get_num_threads() == 1  # every core busy
        assert threads_for_idle_cores(idle=0.4) == 1
        assert threads_for_idle_cores(idle=1000.0) == DEFAULT_THREADS == torch.get_num_threads()  # never above
    finally:
        torch.set_num_threads(DEFAULT_THREADS)


def test_idle_cores_is_a_share_of_the_machine():
    import psutil

    assert 0.0 <= idle_cores(0.1) <= psutil.cpu_count()


def test_the_note_says_when_the_threads_were_lowered():
    try:
        assert busy_cores_note(idle=1000.0) == ""  # idle: the default, nothing to say
        lowered = busy_cores_note(idle=0.0)
        assert lowered == ("" if DEFAULT_THREADS == 1 else f"driver: 1 of {DEFAULT_THREADS} threads, cores busy")
    finally:
        torch.set_num_threads(DEFAULT_THREADS)
