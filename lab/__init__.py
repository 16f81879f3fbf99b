# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local test lab of rabbitguard.limiter (see lab/lab.py): ``import lab; lab.up()``."""

from .lab import (  # noqa: F401
    AMQP_PASSWORD,
    AMQP_PORT,
    AMQP_USER,
    AMQP_VHOST,
    RABBITMQ_NODE,
    Config,
    LabError,
    down,
    hosts,
    render_inventory,
    run,
    running,
    status,
    up,
)

__all__ = [
    "AMQP_PASSWORD",
    "AMQP_PORT",
    "AMQP_USER",
    "AMQP_VHOST",
    "RABBITMQ_NODE",
    "Config",
    "LabError",
    "down",
    "hosts",
    "render_inventory",
    "run",
    "running",
    "status",
    "up",
]
