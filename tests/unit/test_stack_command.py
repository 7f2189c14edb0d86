from typer.testing import CliRunner

from visionops.cli import app
from visionops.ops.stack import Stack


def test_stack_up_without_postgres_says_so_and_starts_nothing(tmp_path):
    url = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["stack", "up", "--project", str(tmp_path),
                                      "--state-dir", str(state), "--postgres-url", url])
    assert result.exit_code == 1
    assert f"No PostgreSQL answered at {url}" in result.output
    assert "apt install postgresql" in result.output and "VISIONOPS_POSTGRES_URL" in result.output
    assert Stack.load(tmp_path, state).pids == {}
    assert oct((state / "state.json").stat().st_mode & 0o777) == "0o600"


def test_stack_env_before_up_points_at_up(tmp_path):
    result = CliRunner().invoke(app, ["stack", "env", "--project", str(tmp_path)])
    assert result.exit_code == 1 and "visionops stack up" in result.output


def test_a_password_on_stack_ups_command_line_is_refused_before_anything(tmp_path):
    url = "postgresql://postgres:s3cret@127.0.0.1:1/postgres"
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["stack", "up", "--project", str(tmp_path),
                                      "--state-dir", str(state), "--postgres-url", url])
    assert result.exit_code == 1
    assert "VISIONOPS_POSTGRES_URL" in result.output and "s3cret" not in result.output
    assert not state.exists()
