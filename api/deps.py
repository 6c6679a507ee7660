"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from agents.agent import DeFiAgent
from config import Settings
from services.sessions import SessionStore


def get_agent(request: Request) -> DeFiAgent:
    """The agent built at start-up."""
    agent: DeFiAgent = request.app.state.agent
    return agent


def get_sessions(request: Request) -> SessionStore:
    """The session store built at start-up."""
    store: SessionStore = request.app.state.agent.sessions
    return store


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


AgentDep = Annotated[DeFiAgent, Depends(get_agent)]
SessionsDep = Annotated[SessionStore, Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
