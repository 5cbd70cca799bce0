"""A stand-in for the ``claude`` CLI (Claude Code 2.1.330) that replays real recordings.

Run as ``tests/fake_claude.py``, a launcher that imports this module, so that its bytecode is cached rather
than compiled at every start.

Two modes, as the real CLI has them:

* print mode (``-p``): one run, one turn (or one per stdin line with ``--input-format stream-json``). Its
  recordings are in ``tests/fixtures/claude-cli/`` (``NAME.jsonl``: the real CLI's stdout, ``NAME.json``: its
  argv, exit code, stderr and timings; see ``../shared/docs/claude-cli.md``). Documented first, below.
* SDK streaming mode (no ``-p``, ``--input-format stream-json``): one long-lived process, many turns, JSON lines
  both ways over stdin/stdout, like the Agent SDK drives the CLI. Its recordings are in
  ``tests/fixtures/claude-cli-sdk/`` (``NAME.jsonl``: ``{"t", "dir": "in"|"out"|"err"|"event", "line"}``, the
  whole conversation; ``NAME.json``: argv, exit code, notes; see ``../shared/docs/claude-cli-sdk.md``).
  See "SDK streaming mode" at the end.

Python 3.11 standard library only; start-up does nothing heavy before the first line.

Arguments, parsed the way the real CLI's commander parser does
--------------------------------------------------------------
``-p/--print``, ``--verbose``, ``--output-format FMT`` (text|json|stream-json), ``--input-format FMT``
(text|stream-json), ``-r/--resume [ID]``, ``--fork-session``, ``--dangerously-skip-permissions``,
``--permission-mode MODE``, ``--allowedTools/--allowed-tools`` and ``--disallowedTools/--disallowed-tools``
(VARIADIC: every following argument that does not start with ``-`` is one more value; ``--opt=value`` takes
exactly one value), ``--model X``, ``--max-turns N``, ``--max-budget-usd X``, ``--include-partial-messages``,
``--effort LEVEL`` (low|medium|high|xhigh|max), ``--system-prompt TEXT``, ``--append-system-prompt TEXT``,
``--system-prompt-snapshot on|off``, ``--json-schema JSON`` (these seven: print mode checks and ignores them;
``replay=i1_partial_messages`` and ``replay=i6_max_turns_1_tool`` show their recorded output; SDK mode acts on them,
below), ``--permission-prompt-tool TOOL`` (print mode ignores it), ``--session-id UUID`` (below), ``-v/--version``
(prints ``2.1.330 (Claude Code)``, exit 0), ``-h/--help`` (the real help text of recording
e1_prompt_dashdash_help, exit 0, also when it stands where a prompt was meant), ``--`` (everything after it
is an operand). ``--opt=value`` and ``-rVALUE`` work as in commander. The prompt is the first operand;
further operands are ignored (so is everything after ``-- PROMPT``). The subcommand ``auth status`` is under
"Credentials" below.

Errors, with the real CLI's texts (nothing on stdout):
  unknown option                 ``error: unknown option '<opt>'``, exit 1
  option value missing           ``error: option '<flags>' argument missing``, exit 1
  value not among the choices    ``error: option '<flags>' argument '<v>' is invalid. Allowed ...``, exit 1
                                 (--output-format, --input-format, --permission-mode, --system-prompt-snapshot;
                                 --effort too, a guess: its help lists the levels, not as commander "choices")
  --max-turns not an integer > 0, --max-budget-usd not a number > 0   (guessed texts, commander's form for a
                                 refused value) ``error: option '--max-turns <turns>' argument '<v>' is invalid.
                                 --max-turns must be a positive integer`` (``--max-budget-usd must be a positive
                                 number``), exit 1
  --json-schema not a JSON object  ``Error: Invalid JSON in --json-schema: <why>``, exit 1 (a guess)
  stream-json without --verbose  ``Error: When using --print, --output-format=stream-json requires --verbose``
  no prompt at all               ``Error: Input must be provided either through stdin or as a prompt ...``,
                                 preceded by ``"<v>" was read as a value of --allowedTools, not as a
                                 prompt · put a prompt before --allowedTools or after --`` when a variadic
                                 tool option swallowed a value after its first one (recording
                                 d1_allowed_comma), exit 1
  whitespace-only prompt         ``Error: Input contained only whitespace. ...``, exit 1
  root + --dangerously-skip-permissions (or --permission-mode bypassPermissions) without IS_SANDBOX=1
                                 stderr and exit code of recording c1_dsp_root
  --session-id not a UUID        ``Error: Invalid session ID. Must be a valid UUID.``, exit 1
  --session-id with --resume     ``Error: --session-id can only be used with --continue or --resume if
  but no --fork-session          --fork-session is also specified.``, exit 1 (both texts from the real CLI's
                                 source, not recorded)
  --session-id already in use    (with FAKE_STATE_DIR: ``sessions/<id>`` exists) ``Error: Session ID <id> is
                                 already in use.``, exit 1 (recording s11c_session_id_reuse)
  fake limitations               neither ``-p`` nor ``--input-format stream-json``, or an output format other
                                 than stream-json: a ``fake_claude:`` message and exit 2; so do bad knob
                                 values (below)

Prompt: the operand and/or stdin. Stdin is read to EOF unless it is a TTY; with an operand too the prompt
is ``<operand>\\n<stdin>``. A pipe or socket that delivers nothing (not even EOF) for FAKE_STDIN_WAIT_MS
gets the real CLI's warning (recording g11) and the run goes on without stdin; a pipe with data that is
never closed blocks for ever, as with the real CLI. Bytes that are not UTF-8 become U+FFFD.
``--input-format stream-json``: every stdin line ``{"type":"user","message":{"content":...}}`` is one turn
answered with its own init ... result (recording i10), all with one session id; exit code of the last turn.

Sessions
--------
New runs get a fresh uuid4. ``--resume ID``: a value that is not a UUID (8-4-4-4-12 hex, any case) is
answered like recording b5_resume_malformed (one result line with a NEW random session_id, stderr, exit 1);
a UUID not in ``$FAKE_STATE_DIR/sessions/`` (case-sensitive) like b4_resume_unknown_uuid (the id as given,
exit 1); a known one keeps its id (``--fork-session`` or knob new_id=1: a new id). Without FAKE_STATE_DIR
every UUID counts as known. ``--resume`` with no value is treated as the malformed value "" (a guess).
``--session-id UUID`` makes UUID the session id (refused as listed under errors).

Output
------
Lines of a recording (default a_hello: init, assistant text, result), each written with ONE os.write like
the real CLI, with session_id replaced by the current id, the recording's cwd by os.getcwd(), and fresh
``uuid`` and ``timestamp`` values. Every ``system/init`` line gets an extra key
``"fake": {"prompt": ..., "argv": [...the whole argv...], "prompt_source": "arg"|"stdin"|"both"}``.
A broken stdout pipe is ignored and the run goes on (like the real CLI).

State (all optional, under ``$FAKE_STATE_DIR``)
------------------------------------------------
``invocations.jsonl``  one JSON line per run, written before the first stdout line (or at exit): argv
                       (the whole argv, argv[0] too), cwd, prompt, prompt_source, stdin_kind (tty, devnull, chr, fifo,
                       sock, file, closed, other), stdin_timed_out, pid, ppid, pgid, sid, env (IS_SANDBOX,
                       CLAUDE_CONFIG_DIR, every CLAUDESRV_* and FAKE_MARK* variable), scenario (the knobs),
                       session_id, resume, started_at (time.time() at start), mode ("print" or "sdk").
``sessions/<id>``      one file per session id handed out (content: the cwd).
``signals.log``        ``<pid> <SIGNAME>`` per signal received (SIGINT, SIGTERM, SIGHUP).
``grandchildren``      one pid per line (knob grandchild).

Signals
-------
SIGINT: like recording g23_sigINT_midstream_hang: an aborted assistant line, a user line
``[Request interrupted by user]``, a result with ``subtype: error_during_execution``,
``terminal_reason: aborted_streaming``, ``is_error: true``; grandchildren killed; exit 0 (after the result
line was written: no more lines, exit 0). SIGTERM: grandchildren killed, exit 143, no result line.
SIGHUP: grandchildren killed, exit 129. SIGKILL leaves grandchildren running (their own session).

Environment
-----------
FAKE_STATE_DIR       state directory (above); unset: no state is kept
FAKE_TIME_SCALE      0 (default): no pauses; S: sleep S x the recording's own gaps before each line and
                     after the last one (line_times_s of NAME.json, else the lines evenly spread over the
                     first 80 % of the time between first_stdout_line_s and wall_s_to_exit)
FAKE_STDIN_WAIT_MS   3000: how long an open, silent stdin pipe is waited for
FAKE_SCENARIO        knobs as ``key=value key=value`` (``[[fake ...]]`` around it is optional)
FAKE_FIXTURES_DIR    where the recordings are (default: fixtures/claude-cli next to this file)
FAKE_LOGGED_OUT      0; 1: every turn and ``auth status`` as without credentials (see Credentials)

Knobs (scenario)
----------------
A tag ``[[fake key=value ...]]`` anywhere in the prompt (the first tag counts), merged key by key over
FAKE_SCENARIO; the prompt wins. Unknown keys and non-integer values: message on stderr, exit 2.
  replay=NAME              replay recording NAME instead of a_hello: its lines, stderr and exit code
  lines=N                  N generated assistant lines (id ``msg_fake_%08d``) in place of the recording's
                           lines between init and result
  line_bytes=B             each generated line exactly B bytes without the newline (at least ~530: shorter
                           asks give the bare frame); default a short text. line_bytes alone means lines=1
  delay_ms=D               sleep D ms before each line after the init line
  init_delay_ms=D          sleep D ms before the first line
  giant=BYTES              one more assistant line of exactly BYTES bytes (id msg_fake_00000000) right after
                           init, written in 1 MiB os.write pieces
  split=1                  write each line in up to 9 pieces (the newline alone) with 1 ms sleeps between
  block=1                  buffer stdout and write 64 KiB chunks regardless of line boundaries (the rest is
                           flushed before every pause, hang, crash and exit); wins over split
  hang=1                   after the init line and any generated lines (the recording's other lines are
                           left out), wait for ever (until a signal)
  no_init=1                nothing at all on stdout (no session id); exit code default 1
  exit=N                   exit code (default: the recording's); with exit != 0 the result says is_error
  stderr=TEXT              TEXT ('_' stands for a space) written to stderr before the first stdout line
  no_result=1              no result line
  crash=1                  like hang, but die by SIGSEGV instead of waiting (grandchildren survive)
  ignore_signals=1         SIGINT, SIGTERM and SIGHUP are only logged; only SIGKILL stops the fake
  grandchild=1             before the first line, start ``sleep 1000`` in a new session with stdio on
                           /dev/null (like the real CLI's Bash tool); killed on SIGINT, SIGTERM, SIGHUP
                           and normal exit, not on SIGKILL or crash
  result_then_linger_ms=D  stay alive D ms after the result line (the real CLI: 100-600 ms)
  session_line=K           the session id first appears on line K: K-1 ``system/status`` lines without a
                           session_id come first
  new_id=1                 ``--resume`` of a known id answers with a new id (as CLI versions before 2.1.330
                           did, and --fork-session still does); the new id is recorded as a session too
  auth=none                this turn as without credentials (see Credentials)

Credentials
-----------
``claude auth status [--json|--text]`` (argv ``auth status``; nothing else of ``auth`` exists here: stderr and
exit 1) answers at once, offline, like the real one (``../shared/docs/claude-cli-sdk.md`` section 7; the fields
and texts as the C fake in ``tests/bench/`` has them from the real CLI's source): JSON as
``JSON.stringify(x, null, 2)`` writes it, ``loggedIn``, ``authMethod``, ``apiProvider`` (``firstParty``),
``analyticsDisabled``, ``projectsDirectory``, ``configDirectory`` (``$CLAUDE_CONFIG_DIR`` or ``~/.claude``),
``loginExpiresAt`` and ``apiKeySource``; exit 0 when logged in, 1 when not. The fake is logged in unless
FAKE_LOGGED_OUT=1 (so a daemon that checks credentials is ready in every other test): ``authMethod`` ``api_key``
with ``apiKeySource`` ``ANTHROPIC_API_KEY`` when that variable is set (not empty), ``oauth_token`` with
``ANTHROPIC_AUTH_TOKEN`` or ``CLAUDE_CODE_OAUTH_TOKEN``, else ``api_key`` from ``/login managed key`` (with
``email``, ``orgId``, ``orgName`` null). Logged out: ``"loggedIn": false, "authMethod": "none"``. ``--text``:
``Not logged in. Run claude auth login to authenticate.``, ``API key: <source>`` or ``Auth token: <variable>``.

FAKE_LOGGED_OUT=1 (every turn, both modes) or the knob ``auth=none`` (one turn) make a turn what the real CLI
answers without credentials (its recording g19, described in ``tests/bench/README.md``; the lines here are
recording g3_FAIL401_retries0's, the API's 401, changed as g19 differs): ``system/init`` with ``apiKeySource``
``none``, an ``assistant`` line from model ``<synthetic>`` with the text ``Not logged in · Please run /login``,
``"error": "authentication_failed"`` and ``"is_api_error_message": true``, then a ``result`` with ``subtype``
``success``, ``is_error`` true, ``terminal_reason`` ``api_error``, ``api_error_status`` null, ``result`` the same
text, no cost (``modelUsage`` and ``model_usage_since_last_result`` empty). Print mode exits 1; SDK mode takes the
next turn. Knobs that shape a turn's lines (lines, replay, tool, reply, hang, exit, ...) are ignored then. Otherwise
system/init's ``apiKeySource`` is the recordings' (``ANTHROPIC_API_KEY``) whatever the environment.

SDK streaming mode
==================
Selected by ``--input-format stream-json`` without ``-p``; needs ``--output-format stream-json`` (else
``Error: --input-format=stream-json requires output-format=stream-json.``, exit 1) and ``--verbose`` (else the
print-mode message), as the real CLI does. A daemon starts it as::

    fake_claude.py --output-format stream-json --verbose --input-format stream-json --permission-prompt-tool stdio
        (--session-id=<uuid> | --resume=<uuid>) [--dangerously-skip-permissions] [--model=M] [--permission-mode=P]
        [--effort=L] [--system-prompt=T] [--append-system-prompt=T] [--system-prompt-snapshot=on|off]
        [--max-turns=N] [--max-budget-usd=X] [--json-schema=JSON] [--include-partial-messages]
        [--allowedTools X ...] [--disallowedTools X ...] --

Values given with ``=`` may start with ``-`` (``--system-prompt=-You are terse.``), as in commander. ``--model``
sets system/init's and the assistant lines' model (aliases as set_model resolves them), ``--permission-mode`` the
mode. ``--effort``, ``--system-prompt``, ``--append-system-prompt`` and ``--system-prompt-snapshot`` change nothing
in the replies; like ``--max-turns``, ``--max-budget-usd``, ``--json-schema`` (parsed) and
``--include-partial-messages`` they are shown in system/init's ``fake`` key and turns.jsonl (None/false when not
given). What the others do is under "A turn".

Every stdout line is a recorded line (so its keys and their order are the real CLI's) with this process's
session id, pid, cwd, model and permission mode, fresh ``uuid``s and timestamps, written with one os.write.
``<WORKSPACE>``, ``<HOME>`` and ``<TMPDIR>`` of the recordings become the cwd, $HOME and $CLAUDE_CODE_TMPDIR.

Start-up: stdin stays open; nothing is written on stdout until the host writes a line (s01c), and the first
answer comes no sooner than FAKE_STARTUP_MS after spawn. ``initialize`` is optional (s01b).

stdin, one JSON object per line
  blank, ``\\r``-terminated, JSON that is not an object, an unknown ``type``: ignored (s10b)
  not JSON        stderr ``Error parsing streaming input line (type=unknown, N chars): SyntaxError``
                  (N = the line's length), exit 1 at once, no result (s10_bad_stdin_lines)
  control_request (``{"type":"control_request","request_id":R,"request":{"subtype":S,...}}``), answered
  ``{"type":"control_response","response":{"subtype":"success","request_id":R,"response":{...}}}`` or
  ``{...,"response":{"subtype":"error","request_id":R,"error":TEXT,"error_code":CODE}}``:
    initialize           s01's answer with ``pid`` = this process, ``current_permission_mode``,
                         ``session_state`` (idle, running, requires_action) and, beside the inner response,
                         ``pending_permission_requests`` (the open can_use_tool request, as sent: s02i) and
                         ``pending_user_dialog_requests`` ([]); a repeated one is followed by a
                         ``system/background_tasks_changed`` line (s01c, s02i)
    interrupt            ``{"still_queued": [uuids of queued messages]}``. While a can_use_tool request is open,
                         a ``{"type":"control_cancel_request","request_id":<its id>}`` comes first (s02d). A
                         running turn then ends interrupted (below); idle, nothing else (s03c).
                         ``"cancel_queued": true`` drops the queued messages: ``{"still_queued": [],
                         "cancelled": [uuids]}`` and command_lifecycle ``cancelled`` lines (s04d)
    set_permission_mode  ``{"mode": M}``, then a ``system/status`` line (``status: null``) if the mode changed;
                         errors ``invalid_mode`` (not one of acceptEdits auto bypassPermissions default dontAsk
                         plan) and ``bypass_not_launched`` (bypassPermissions without
                         --dangerously-skip-permissions) (s05, s05b)
    set_model            a ``user`` line with ``isReplay: true`` and ``<local-command-stdout>Set model to
                         `M`</local-command-stdout>``, then ``{"model": M}``; aliases as the initialize answer's
                         ``models`` list them (sonnet: ``sonnet (claude-sonnet-5-5)``); no model: the launch
                         model (s05). Later system/init and assistant lines carry the model.
    mcp_status, get_context_usage   the recorded answers (s05)
    anything else        error ``Unsupported control request subtype: S``, ``unsupported_request`` (s05)
  control_response  the host's answer to the open can_use_tool request (same request_id); answers to other
                    ids (e.g. a request that was cancelled) are ignored (s02d)
  user              ``{"type":"user","message":{"role":"user","content":C},...}``: a turn. C is a string or a
                    list of content blocks: its text blocks joined by "\\n" are the prompt (the reply is computed
                    from them alone); image blocks (``{"type":"image","source":{"type":"base64","media_type":M,
                    "data":...}}``) are recorded as their media types (``images``). Messages that arrive while a turn
                    runs are queued, and all of them run as ONE next turn, texts joined by "\\n" (s04a,
                    s04b). A message with a ``uuid`` gets top-level ``command_lifecycle`` lines (queued,
                    started, completed or cancelled) and ``user_message_uuid(s)`` keys in its turn's lines
                    (s04b, s04d).

A turn
  ``system/init`` (s01's; with ``--permission-prompt-tool stdio`` s02a's, whose tools add AskUserQuestion,
  EnterPlanMode and ExitPlanMode; --disallowedTools names taken out; a model outside the recorded model list
  gets the task tools s05 shows for claude-haiku-4-5), plus the key ``"fake": {"prompt", "argv" (the whole
  argv), "pid", "turn" (0, 1, ...), the spawn options as in turns.jsonl, "images"}``; the assistant line(s);
  the ``result`` (s01's keys; the line does not start with "type"; ``result_index`` 0, 1, 2 ... per process;
  ``total_cost_usd`` and ``modelUsage`` cumulative per process, ``model_usage_since_last_result`` per turn,
  0.010664 per model call; ``num_turns`` the model calls). The reply is what the recordings' mock API answered:
  ``MOCK-REPLY: <prompt> [len=N sha256=<16 hex>]``, where the prompt after an aborted_streaming turn starts with
  ``[Request interrupted by user]\\n\\n`` (s03a). Each turn started is appended to turns.jsonl.

--include-partial-messages (s03b_interrupt_hang_partial; i1_partial_messages in print mode): a ``system/status``
``requesting`` line (s03b's) before each model call, and around every assistant line of a model reply the
``stream_event`` lines s03b shows: ``message_start`` before the message's first block (message id = the assistant
lines' id = every event's ``api_message_id``), ``content_block_start`` and the block's ``content_block_delta``
lines before its assistant line (text in 40-character ``text_delta`` pieces, as the recordings' mock API sent
them), ``content_block_stop`` after it, and after the message's last block ``message_delta`` (``stop_reason``
end_turn, or tool_use for a tool message) and ``message_stop``. Each result gets ``begun_message_ids`` (the
turn's message ids, after ``uuid``). hang=1 streams the first piece, then hangs; its interrupt gives s03b's
ending: the aborted assistant line holds what was streamed, then the interrupted user line,
``content_block_stop``, s03b's aborted ``message_delta`` and a ``message_stop`` with ``abandoned_blocks``
``{api_message_id, from_block_index}``, then the result. Generated lines (lines=, giant=) get no events. Without
the flag: no status and no stream_event lines (s01).

--max-turns=N: a turn that needs more model calls than N (a tool turn needs 2, so only N=1 matters) runs its
first call and its tools, then ends with i6_max_turns_1_tool's result line (print mode; SDK mode is not
recorded): ``subtype: "error_max_turns"``, ``is_error: true``, ``terminal_reason: "max_turns"``, ``stop_reason:
"tool_use"``, ``errors: ["Reached maximum number of turns (N)"]``, no ``result`` key, ``num_turns`` 1 + one per
tool call, the cost of one call. The process stays for the next turn.

--max-budget-usd=X (a guess throughout): when the process's total_cost_usd with this turn's model calls so far
exceeds X after a model call, the turn ends with the same line as error_max_turns, but ``subtype:
"error_max_budget_usd"``, ``terminal_reason: "max_budget_usd"``, ``errors: ["Reached maximum budget ($X)"]``,
``is_error: true``; after the first call of a tool turn, its tools do not run. The process stays.

--json-schema=JSON (a guess: not recorded): a success result gets ``structured_output`` right after ``result``:
the simplest value the schema allows (objects: every property, required or not; string "MOCK", number and
integer 0, boolean false, array [], nested objects filled the same way; ``enum``: its first value; ``const``:
itself; anyOf/oneOf/allOf: the first). The reply text does not change.

An interrupted turn (interrupt request, SIGINT, or a deny with ``interrupt: true``): grandchildren are killed.
Streaming: an assistant line with ``"aborted": true`` (half the reply), a user line
``[Request interrupted by user]``, a result ``error_during_execution``, ``is_error: true``,
``terminal_reason: aborted_streaming`` (s03a, s07e). During a tool call: the tool_result "The user doesn't want
to proceed with this tool use...", a user line ``[Request interrupted by user for tool use]``, a result with
``terminal_reason: aborted_tools`` and the call in ``permission_denials`` (s02b2, s02d). The process stays up
for the next turn (after SIGINT it exits 0).

Tools (knob ``tool=NAME`` or ``tool=NAME1,NAME2,...``): an assistant text line ``I will use NAME.`` (``I will use
NAME1, NAME2.``) and one assistant tool_use line per tool (same message id), then each call's decision in turn, ONE
at a time (s02g): the next call is decided only after the previous one's tool_result. A call that is asked about
gets its can_use_tool request before the message's later tool_use lines; one that is not has them printed before
its tool_result. Each call's decision:
  NAME in --disallowedTools     an error tool_result ``No such tool available: NAME`` (a guess)
  allowed without asking        NAME in --allowedTools (values split at commas and spaces outside
                                parentheses; the exact tool name matches, a rule such as ``Bash(git *)`` never
                                does), a whole-tool rule the host sent back in ``updatedPermissions`` (s02e3),
                                mode bypassPermissions (--dangerously-skip-permissions) or acceptEdits for
                                Write/Edit/MultiEdit/NotebookEdit: the tool runs, no request
  --permission-prompt-tool stdio (mode not dontAsk): a ``can_use_tool`` control_request with a UUID request_id
                                (s02a's shape: display_name, input, description, permission_suggestions,
                                blocked_path, tool_use_id; s09's for AskUserQuestion: requires_user_interaction),
                                then the fake WAITS, with no time-out and no output (s02c), for the host's answer:
      allow [+ updatedInput]    the tool runs with updatedInput, else the original input (s02a, s02f)
      deny + message            an error tool_result with exactly that message; the call goes into
                                ``permission_denials``; the turn ends ``success`` (s02b)
      deny + interrupt: true    the aborted_tools ending above (s02b2); later calls of the message are not asked
      an error response         tool_result ``Tool permission request failed: Error: <error>`` (s02f)
      stdin EOF                 tool_result ``Tool permission request failed: AbortError: Tool permission stream
                                closed before response received``; the turn ends normally, then exit 0 (s07f)
  otherwise                     auto-denied: ``system/permission_denied`` and an error tool_result (s02h)
An interrupt while a request is open cancels it and ends the turn the same way (s02d). Then the final assistant
line ``MOCK-FINAL after tool: [{"id", "is_error", "content"}, ...]`` (one entry per call, in order) and the result
(2 model calls; ``num_turns`` 1 + one per call: 2 for one tool, 3 for two, as s02a and s02g show).
Nothing is executed. Inputs: Bash ``{"command": "echo hi > file.txt", "description": ...}`` (s02a) or ``cmd=``;
with several tools the first Bash gets ``cmd=`` or s02g's ``echo one > one.txt``, every later Bash s02g's ``echo two
> two.txt``; AskUserQuestion s09's question, its tool_result built from ``updatedInput.answers`` (s09); Write, Edit,
MultiEdit, NotebookEdit ``file.txt`` in the cwd; other tools ``{}``.

Ending: stdin EOF: the running turn and the queued messages finish, then exit 0 after 40 ms (s07a, s07b);
SIGINT idle: exit 0, nothing printed (s07c); SIGINT during a turn: the interrupted ending, exit 0 (s07e);
SIGTERM: exit 143, SIGHUP: 129, nothing printed (s07d). Grandchildren are killed in all these cases, not on
SIGKILL or crash.

Sessions: a new uuid4 per process, or ``--session-id=UUID`` (refused when ``sessions/<id>`` exists: s11c).
``sessions/<id>`` is written when the first turn starts. ``--resume=ID``: a known id is kept (s06, s11b); an
unknown UUID (like b4) or a malformed value (like b5) is refused as in print mode, with its one error result
line and exit 1, but only after the host's first line (nothing is printed before).

Knobs, per turn: a ``[[fake key=value ...]]`` tag in the turn's prompt text, merged over FAKE_SCENARIO. Unknown
keys and non-integer values: message on stderr, exit 2.
  lines, line_bytes, delay_ms, init_delay_ms, giant, split, block   as in print mode, for this turn's lines
                 (generated lines take the place of the reply line; split and block last for the turn)
  hang=1         after system/init and any generated lines, wait until an interrupt request or a signal (stdin
                 EOF does not end it)
  crash=1        die by SIGSEGV after system/init and any generated lines; grandchildren survive
  die=N          exit N right after the turn's first assistant line; no result (grandchildren are killed)
  no_init=1      nothing at all on stdout for this turn: its stderr= text, then exit with ``exit=N`` (default 1),
                 like a CLI that fails before it says anything (the turn is in turns.jsonl, the session is not
                 recorded)
  no_result=1    the turn's lines without its result, then exit 0
  ignore_signals=1  from this turn on, SIGINT, SIGTERM and SIGHUP are only logged (interrupt requests still work)
  ignore_interrupt=1  from this turn on, an interrupt request is answered but ends nothing (a CLI stuck where it
                 cannot abort; signals still work unless ignore_signals)
  grandchild=1   start ``sleep 1000`` in its own session (killed on interrupt, SIGINT/SIGTERM/SIGHUP and exit)
  tool=NAME      a tool call (above); ``tool=NAME1,NAME2`` several in one message; ``cmd=TEXT`` the (first) Bash
                 command
  tool_ms=D      an allowed tool runs D ms; an interrupt meanwhile gives s03d's "stopped while running"
                 tool_result and aborted_tools (no denial)
  reply=TEXT     the final assistant text and the result's ``result``
  auth=none      this turn as without credentials (see Credentials)
  stderr=TEXT    written to stderr when the turn starts
(in ``cmd=``, ``reply=`` and ``stderr=``, ``_`` stands for a space)

Environment, process-wide
FAKE_SCENARIO          the knobs of every turn (a turn's tag wins)
FAKE_STATE_DIR         state directory (below); unset: no state is kept
FAKE_STARTUP_MS        0: the simulated start-up; the first answer comes no sooner than this after spawn (the
                       real CLI needs ~400 ms, s01)
FAKE_TIME_SCALE        0: no pauses; S > 0: sleep S x the recorded gaps (s01's warm turn, s02a's tool turn)
                       before each line of a turn
FAKE_LOGGED_OUT        0; 1: every turn and ``auth status`` as without credentials (see Credentials)
FAKE_SDK_FIXTURES_DIR  where the SDK recordings are (default: fixtures/claude-cli-sdk next to this file)

State (under ``$FAKE_STATE_DIR``): ``invocations.jsonl`` (written at start, ``"mode": "sdk"``), ``signals.log``,
``grandchildren``, ``sessions/<id>`` as in print mode, and
  ``turns.jsonl``        one line per turn started: pid, session_id, prompt (the merged text), turn (0, 1, ...),
                         allowed_tools, disallowed_tools (the patterns, split), skip_permissions,
                         permission_mode, model, uuids, effort, system_prompt, append_system_prompt,
                         system_prompt_snapshot, max_turns (int), max_budget_usd (float), json_schema (parsed),
                         include_partial_messages, images (media types of the turn's image blocks, in order)
  ``stdin.jsonl``        one line per stdin line received: pid, line (the raw line without its newline)
  ``permissions.jsonl``  one line per can_use_tool request: pid, turn, request_id, tool_name
  ``tools.jsonl``        one line per tool that "ran": pid, turn, tool_name, tool_use_id, input (the one used)

Not replayed: hooks and ``defer`` (s08*), the settings file an ``updatedPermissions`` rule writes (s02e), the cost
a ``--resume``d session carries over (s06, s11b: the real total_cost_usd continues the session's, the fake's starts
at 0 in each process), what --effort and the system prompt options do to the model (nothing visible with the mock).
Guessed, not recorded: where the later tool_use lines come when the first call is not asked about, and what a deny
+ interrupt or an interrupt does to the message's later calls (the fake leaves them without a tool_result). For the
spawn options: stream events of tool_use blocks (a content_block_start with ``input: {}`` and ONE
``input_json_delta`` holding the whole input), of several messages in a turn, and of an interrupt that lands
between blocks or before the first; whether stream_event lines carry ``user_message_uuid(s)`` (the fake: no);
``begun_message_ids: []`` when nothing was streamed; error_max_turns in SDK mode (print mode's i6 line, the process
staying) and with several tool calls (``num_turns``); everything about --max-budget-usd (when it is checked, ``>``
rather than ``>=``, subtype, terminal_reason, errors text, tools skipped) and --json-schema (``structured_output``,
its place and values, the refusal text); the refusal texts for --effort, --max-turns and --max-budget-usd.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import sys
import time
from bisect import bisect_right

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing would cost start-up time
    from collections.abc import Callable
    from typing import Any, NoReturn

START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("FAKE_FIXTURES_DIR") or os.path.join(HERE, "fixtures", "claude-cli")
VERSION = "2.1.330 (Claude Code)"
DEFAULT_RECORDING = "a_hello"

MSG_NO_INPUT = "Error: Input must be provided either through stdin or as a prompt argument when using --print"
MSG_WHITESPACE = (
    "Error: Input contained only whitespace. Provide a prompt with text through stdin or as a prompt "
    "argument when using --print"
)
MSG_NEEDS_VERBOSE = "Error: When using --print, --output-format=stream-json requires --verbose"

INT_KNOBS = frozenset(
    (
        "lines",
        "line_bytes",
        "delay_ms",
        "init_delay_ms",
        "giant",
        "split",
        "block",
        "hang",
        "no_init",
        "exit",
        "no_result",
        "crash",
        "ignore_signals",
        "grandchild",
        "result_then_linger_ms",
        "session_line",
        "new_id",
    )
)
STR_KNOBS = frozenset(("replay", "stderr", "auth"))

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SID_RE = re.compile(rb'"session_id":"([0-9a-f-]{36})"')
CWD_RE = re.compile(rb'"cwd":"((?:[^"\\]|\\.)*)"')
LINE_UUID_RE = re.compile(rb'"uuid":"[0-9a-f-]{36}"')
STAMP_RE = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
INIT_PREFIX = b'{"type":"system","subtype":"init"'

MIB = 1 << 20
BLOCK = 64 * 1024


# ---------------------------------------------------------------- small helpers


def jdump(obj: object) -> bytes:
    """Compact JSON as the CLI writes it: UTF-8, with U+2028/U+2029 escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode("utf-8")


def jstr(text: str) -> bytes:
    """A JSON string's inside (no quotes)."""
    return jdump(text)[1:-1]


def new_uuid() -> str:
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def stamp() -> bytes:
    now = time.time()
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z".encode()


def write_fd(fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write everything (one os.write unless the kernel takes less). False if the fd is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return False
        view = view[n:]
    return True


def err(text: str) -> None:
    if text:
        write_fd(2, (text if text.endswith("\n") else text + "\n").encode("utf-8", "replace"))


def getcwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return os.environ.get("PWD", "/")


# ---------------------------------------------------------------- run state, output, signals


class Out:
    """stdout: one os.write per line (``line``), small pieces (``split``) or 64 KiB chunks (``block``)."""

    def __init__(self) -> None:
        self.mode = "line"
        self.buf = bytearray()
        self.dead = False

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        if not self.dead and not write_fd(1, data):
            self.dead = True  # like the real CLI: ignore EPIPE and run to the end

    def line(self, data: bytes, piece: int = 0) -> None:
        """Write one line (``data`` ends with a newline)."""
        log_invocation()
        if self.mode == "block":
            self.buf += data
            full = len(self.buf) // BLOCK * BLOCK
            if full:
                with memoryview(self.buf) as view:
                    for off in range(0, full, BLOCK):
                        self.raw(view[off : off + BLOCK])
                del self.buf[:full]
        elif self.mode == "split" and len(data) > 1:
            body = len(data) - 1
            step = max(64, -(-body // 8))
            cuts = list(range(0, body, step)) + [body]
            for a, b in zip(cuts, cuts[1:] + [len(data)], strict=True):
                self.raw(data[a:b])
                if b < len(data):
                    time.sleep(0.001)
        elif piece:
            with memoryview(data) as view:
                for off in range(0, len(data), piece):
                    self.raw(view[off : off + piece])
        else:
            self.raw(data)

    def flush(self) -> None:
        if self.buf:
            self.raw(self.buf)
            self.buf.clear()


class Run:
    """Everything the signal handlers need to see."""

    def __init__(self) -> None:
        self.state_dir = os.environ.get("FAKE_STATE_DIR") or None
        self.out = Out()
        self.interrupted = False
        self.ignore_signals = False
        self.result_written = False
        self.silent = False
        self.logged = False
        self.grandchildren: list[int] = []
        self.record: dict[str, object] = {}
        self.wake_fd = -1


RUN = Run()


def state_path(*parts: str) -> str | None:
    if RUN.state_dir is None:
        return None
    path = os.path.join(RUN.state_dir, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def append_state(name: str, data: bytes) -> None:
    path = state_path(name)
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_fd(fd, data)
        finally:
            os.close(fd)


def log_invocation() -> None:
    """Append the invocation record once, before the first stdout line or at exit."""
    if RUN.logged:
        return
    RUN.logged = True
    append_state("invocations.jsonl", jdump(RUN.record) + b"\n")


def kill_grandchildren() -> None:
    while RUN.grandchildren:
        pid = RUN.grandchildren.pop()
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass


def finish(code: int) -> NoReturn:
    RUN.out.flush()
    log_invocation()
    kill_grandchildren()
    os._exit(code)


def fail(message: str, code: int = 1) -> NoReturn:
    err(message)
    finish(code)


def on_signal(signum: int, frame: object) -> None:
    append_state("signals.log", f"{os.getpid()} {signal.Signals(signum).name}\n".encode())
    if RUN.ignore_signals:
        return
    if signum == signal.SIGINT:
        RUN.interrupted = True
        return
    kill_grandchildren()
    log_invocation()
    os._exit(143 if signum == signal.SIGTERM else 129)


def setup_signals() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    RUN.wake_fd = r
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def nap(seconds: float) -> None:
    """Sleep; return early when a SIGINT asks for an abort. Ignored signals do not cut it short."""
    if seconds <= 0:
        return
    RUN.out.flush()
    deadline = time.monotonic() + seconds
    while not RUN.interrupted:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([RUN.wake_fd], [], [], None if left == float("inf") else left)
        if ready:
            try:
                os.read(RUN.wake_fd, 512)
            except OSError:
                pass


def crash() -> None:
    """Die by SIGSEGV (no core file); grandchildren survive."""
    RUN.out.flush()
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)


def spawn_grandchild() -> None:
    """``sleep 1000`` in a new session, stdio on /dev/null: the real CLI's Bash tool processes."""
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            fd = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(fd, target)
            os.closerange(3, 65536)
            os.execvp("sleep", ["sleep", "1000"])
        finally:
            os._exit(127)
    RUN.grandchildren.append(pid)
    append_state("grandchildren", f"{pid}\n".encode())


# ---------------------------------------------------------------- recordings


class Recording:
    def __init__(self, name: str) -> None:
        paths = [os.path.join(FIXTURES, name + ext) for ext in (".json", ".jsonl")]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not all(os.path.isfile(p) for p in paths):
            fail(f"fake_claude: no recording named {name!r} in {FIXTURES}", 2)
        with open(paths[0], encoding="utf-8") as f:
            self.meta: dict[str, object] = json.load(f)
        with open(paths[1], "rb") as f:
            data = f.read()
        self.lines = data.split(b"\n")
        if self.lines and self.lines[-1] == b"":
            self.lines.pop()
        found = SID_RE.search(data)
        self.session_id = found.group(1) if found else None
        found = CWD_RE.search(data)
        self.cwd = found.group(1) if found else None

    @property
    def stderr(self) -> str:
        return str(self.meta.get("stderr") or "")

    @property
    def exit_code(self) -> int:
        value = self.meta.get("exit_code")
        return value if isinstance(value, int) else 0

    def times(self) -> tuple[list[float], float]:
        """Seconds from start to each line, and to the exit."""
        n = len(self.lines)
        first = self.meta.get("first_stdout_line_s")
        first_s = float(first) if isinstance(first, (int, float)) else 0.0
        wall = self.meta.get("wall_s_to_exit")
        wall_s = max(first_s, float(wall)) if isinstance(wall, (int, float)) else first_s
        given = self.meta.get("line_times_s")
        if isinstance(given, list) and len(given) == n:
            return [float(t) for t in given], wall_s
        if n <= 1:
            return [first_s] * n, wall_s
        span = (wall_s - first_s) * 0.8
        return [first_s + span * i / (n - 1) for i in range(n)], wall_s

    def personalize(self, line: bytes, sid: str, fake: bytes | None = None) -> bytes:
        """The line with this run's session id, cwd, uuids and timestamps (and the fake key on init)."""
        if self.session_id:
            line = line.replace(self.session_id, sid.encode())
        if self.cwd:
            line = line.replace(self.cwd, jstr(getcwd()))
        line = LINE_UUID_RE.sub(lambda _: b'"uuid":"' + new_uuid().encode() + b'"', line)
        line = STAMP_RE.sub(lambda _: b'"timestamp":"' + stamp() + b'"', line)
        if fake is not None and line.startswith(INIT_PREFIX) and line.endswith(b"}"):
            line = line[:-1] + b',"fake":' + fake + b"}"
        return line


# ---------------------------------------------------------------- generated lines

_WORDS = (
    "the relay streams every line from stdout to the client as an event session workspace resume tool "
    "result assistant bytes chunk buffer pipe frame server process exit code"
).split()
_WORDS += ["\\n", '\\"quoted\\"', "\\\\path", "\\t", "\\u2028", "café", "naïve", "日本語", "こんにちは", "🚀", "λ", "→"]


class Filler:
    """Deterministic JSON-string filler, cut only between tokens (valid UTF-8 and valid JSON)."""

    def __init__(self) -> None:
        parts: list[bytes] = []
        self.bounds = [0]
        size, x = 0, 2463534242
        while size < BLOCK:
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            token = _WORDS[(x >> 8) % len(_WORDS)].encode() + (b". " if x % 11 == 0 else b" ")
            parts.append(token)
            size += len(token)
            self.bounds.append(size)
        self.pattern = b"".join(parts)

    def make(self, n: int, seq: int) -> bytes:
        out: list[bytes] = []
        pos = self.bounds[(seq * 7919) % (len(self.bounds) - 1)]
        size = len(self.pattern)
        while n > 0:
            if n >= size - pos:
                out.append(self.pattern[pos:])
                n -= size - pos
                pos = 0
            else:
                cut = self.bounds[bisect_right(self.bounds, pos + n) - 1]
                out.append(self.pattern[pos:cut] + b" " * (pos + n - cut))
                n = 0
        return b"".join(out)


_FILLER: list[Filler] = []


def assistant_line(seq: int, size: int | None, total: int, sid: str) -> bytes:
    """An assistant text line shaped like a_hello's; exactly ``size`` bytes when given (and large enough)."""
    head = (
        b'{"type":"assistant","message":{"id":"msg_fake_%08d","type":"message","role":"assistant",'
        b'"model":"claude-opus-5-5","content":[{"type":"text","text":"' % seq
    )
    tail = (
        b'"}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":2723,"output_tokens":1,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0},"context_management":null},'
        b'"parent_tool_use_id":null,"session_id":"'
        + sid.encode()
        + b'","uuid":"'
        + new_uuid().encode()
        + b'","timestamp":"'
        + stamp()
        + b'","request_id":"req_fake_%08d"}' % seq
    )
    if size is None:
        text = b"Fake reply line %d of %d." % (seq, total)
    else:
        if not _FILLER:
            _FILLER.append(Filler())
        text = _FILLER[0].make(max(0, size - len(head) - len(tail)), seq)
    return head + text + tail


def status_line() -> bytes:
    return b'{"type":"system","subtype":"status","status":"requesting","uuid":"' + new_uuid().encode() + b'"}'


# ---------------------------------------------------------------- argv


class Opts:
    def __init__(self) -> None:
        self.print_mode = False
        self.verbose = False
        self.output_format = "text"
        self.input_format = "text"
        self.resume: str | None = None
        self.resume_given = False
        self.fork_session = False
        self.skip_permissions = False
        self.permission_mode: str | None = None
        self.allowed_tools: list[str] | None = None
        self.disallowed_tools: list[str] | None = None
        self.model: str | None = None
        self.max_turns: str | None = None
        self.max_budget_usd: str | None = None
        self.include_partial_messages = False
        self.effort: str | None = None
        self.system_prompt: str | None = None
        self.append_system_prompt: str | None = None
        self.system_prompt_snapshot: str | None = None
        self.json_schema: str | None = None
        self.permission_prompt_tool: str | None = None
        self.session_id: str | None = None
        self.operands: list[str] = []
        self.unknown: list[str] = []
        self.swallowed: tuple[str, str] | None = None  # (value, option) a variadic option took after its first


class Spec:
    def __init__(self, attr: str, kind: str, label: str, choices: tuple[str, ...] = (), listed: str = "") -> None:
        self.attr, self.kind, self.label, self.choices = attr, kind, label, choices
        self.listed = listed or ", ".join(choices)


_PERMISSION_MODES = ("default", "acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan")
SPECS: dict[str, Spec] = {}
for _flags, _spec in (
    (("-p", "--print"), Spec("print_mode", "bool", "-p, --print")),
    (("--verbose",), Spec("verbose", "bool", "--verbose")),
    (("--output-format",), Spec("output_format", "value", "--output-format <format>", ("text", "json", "stream-json"))),
    (("--input-format",), Spec("input_format", "value", "--input-format <format>", ("text", "stream-json"))),
    (("-r", "--resume"), Spec("resume", "optional", "-r, --resume [value]")),
    (("--fork-session",), Spec("fork_session", "bool", "--fork-session")),
    (("--dangerously-skip-permissions",), Spec("skip_permissions", "bool", "--dangerously-skip-permissions")),
    (
        ("--permission-mode",),
        Spec(
            "permission_mode", "value", "--permission-mode <mode>", _PERMISSION_MODES, ", ".join(_PERMISSION_MODES[1:])
        ),
    ),
    (
        ("--allowedTools", "--allowed-tools"),
        Spec("allowed_tools", "variadic", "--allowedTools, --allowed-tools <tools...>"),
    ),
    (
        ("--disallowedTools", "--disallowed-tools"),
        Spec("disallowed_tools", "variadic", "--disallowedTools, --disallowed-tools <tools...>"),
    ),
    (("--model",), Spec("model", "value", "--model <model>")),
    (("--max-turns",), Spec("max_turns", "value", "--max-turns <turns>")),
    (("--max-budget-usd",), Spec("max_budget_usd", "value", "--max-budget-usd <amount>")),
    (("--include-partial-messages",), Spec("include_partial_messages", "bool", "--include-partial-messages")),
    (("--effort",), Spec("effort", "value", "--effort <level>", ("low", "medium", "high", "xhigh", "max"))),
    (("--system-prompt",), Spec("system_prompt", "value", "--system-prompt <prompt>")),
    (("--append-system-prompt",), Spec("append_system_prompt", "value", "--append-system-prompt <prompt>")),
    (
        ("--system-prompt-snapshot",),
        Spec("system_prompt_snapshot", "value", "--system-prompt-snapshot <on|off>", ("on", "off")),
    ),
    (("--json-schema",), Spec("json_schema", "value", "--json-schema <schema>")),
    (("--permission-prompt-tool",), Spec("permission_prompt_tool", "value", "--permission-prompt-tool <tool>")),
    (("--session-id",), Spec("session_id", "value", "--session-id <uuid>")),
    (("-v", "--version"), Spec("version", "version", "-v, --version")),
):
    for _flag in _flags:
        SPECS[_flag] = _spec


def positive_int(value: str) -> int | None:
    return int(value) if re.fullmatch(r"\s*\+?\d+\s*", value) and int(value) > 0 else None


def positive_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 < number < float("inf") else None


NUMBER_CHECKS: dict[str, Callable[[str], str | None]] = {
    "max_turns": lambda v: None if positive_int(v) else "--max-turns must be a positive integer",
    "max_budget_usd": lambda v: None if positive_number(v) else "--max-budget-usd must be a positive number",
}


def emit_option(opts: Opts, spec: Spec, value: str | None) -> None:
    if spec.kind == "bool":
        setattr(opts, spec.attr, True)
    elif spec.kind == "version":
        log_invocation()
        write_fd(1, (VERSION + "\n").encode())
        finish(0)
    elif spec.kind == "variadic":
        values: list[str] = getattr(opts, spec.attr) or []
        values.append(value or "")
        setattr(opts, spec.attr, values)
    else:
        if spec.choices and value not in spec.choices:
            fail(f"error: option '{spec.label}' argument '{value}' is invalid. Allowed choices are {spec.listed}.")
        problem = NUMBER_CHECKS[spec.attr](value or "") if spec.attr in NUMBER_CHECKS else None
        if problem:  # a guess: commander's InvalidArgumentError form
            fail(f"error: option '{spec.label}' argument '{value}' is invalid. {problem}")
        setattr(opts, spec.attr, value)
        if spec.attr == "resume":
            opts.resume_given = True


def parse_argv(args: list[str]) -> Opts:
    """commander's parseOptions, for the options above."""
    opts = Opts()
    dest = opts.operands
    rest = list(args)
    variadic: Spec | None = None

    def maybe_option(arg: str) -> bool:
        return len(arg) > 1 and arg[0] == "-"

    while rest:
        arg = rest.pop(0)
        if arg == "--":
            if dest is opts.unknown:
                dest.append(arg)
            dest.extend(rest)
            break
        if variadic is not None and not maybe_option(arg):
            emit_option(opts, variadic, arg)
            opts.swallowed = (arg, variadic.label.split(",")[0])
            continue
        variadic = None
        spec = SPECS.get(arg) if maybe_option(arg) else None
        if spec is not None:
            if spec.kind in ("value", "variadic"):
                if not rest:
                    fail(f"error: option '{spec.label}' argument missing")
                emit_option(opts, spec, rest.pop(0))
            elif spec.kind == "optional":
                emit_option(opts, spec, rest.pop(0) if rest and not maybe_option(rest[0]) else None)
            else:
                emit_option(opts, spec, None)
            variadic = spec if spec.kind == "variadic" else None
            continue
        if len(arg) > 2 and arg[0] == "-" and arg[1] != "-":
            spec = SPECS.get(arg[:2])
            if spec is not None:
                if spec.kind in ("value", "variadic", "optional"):
                    emit_option(opts, spec, arg[2:])
                else:
                    emit_option(opts, spec, None)
                    rest.insert(0, "-" + arg[2:])
                continue
        if arg.startswith("--") and "=" in arg[3:]:
            name, _, value = arg.partition("=")
            spec = SPECS.get(name)
            if spec is not None and spec.kind in ("value", "variadic", "optional"):
                emit_option(opts, spec, value)
                continue
        if maybe_option(arg):
            dest = opts.unknown
        dest.append(arg)
    return opts


# ---------------------------------------------------------------- stdin, prompt, scenario


def read_stdin(wait_ms: int) -> tuple[bytes | None, str, bool]:
    """(data or None, kind, timed out) -- like the real CLI: no TTY, a silent pipe is given up."""
    try:
        st = os.fstat(0)
    except OSError:
        return None, "closed", False
    if os.isatty(0):
        return None, "tty", False
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        kind = "devnull" if (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3) else "chr"
    elif stat.S_ISFIFO(mode):
        kind = "fifo"
    elif stat.S_ISSOCK(mode):
        kind = "sock"
    elif stat.S_ISREG(mode):
        kind = "file"
    else:
        kind = "other"
    if kind in ("fifo", "sock"):
        ready, _, _ = select.select([0], [], [], wait_ms / 1000)
        if not ready:
            err(Recording("g11_stdin_pipe_open_with_prompt").stderr)
            return None, kind, True
    chunks = []
    while True:
        try:
            chunk = os.read(0, MIB)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), kind, False


def parse_knobs(
    text: str, where: str, ints: frozenset[str] = INT_KNOBS, strs: frozenset[str] = STR_KNOBS
) -> dict[str, str]:
    knobs: dict[str, str] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not eq or (key not in ints and key not in strs):
            fail(f"fake_claude: bad knob {token!r} in {where}; known: {', '.join(sorted(ints | strs))}", 2)
        if key in ints and not re.fullmatch(r"-?\d+", value):
            fail(f"fake_claude: knob {key} wants an integer, got {value!r} in {where}", 2)
        knobs[key] = value
    return knobs


def knobs_of(
    text: str, where: str, ints: frozenset[str] = INT_KNOBS, strs: frozenset[str] = STR_KNOBS
) -> dict[str, str]:
    start = text.find("[[fake")
    if start < 0:
        return {}
    end = text.find("]]", start)
    if end < 0:
        return {}
    return parse_knobs(text[start + 6 : end], where, ints, strs)


def env_knobs(ints: frozenset[str] = INT_KNOBS, strs: frozenset[str] = STR_KNOBS) -> dict[str, str]:
    text = os.environ.get("FAKE_SCENARIO", "").strip()
    if text.startswith("[[fake") and text.endswith("]]"):
        text = text[6:-2]
    return parse_knobs(text, "FAKE_SCENARIO", ints, strs)


class Scenario:
    def __init__(self, knobs: dict[str, str]) -> None:
        self.knobs = knobs

    def num(self, key: str, default: int = 0) -> int:
        value = self.knobs.get(key)
        return int(value) if value is not None else default

    def flag(self, key: str) -> bool:
        return self.num(key) != 0


def env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        fail(f"fake_claude: {name} must be a number, got {value!r}", 2)


# ---------------------------------------------------------------- credentials

NOT_LOGGED_IN = "Not logged in \u00b7 Please run /login"
AUTH_RECORDING = "g3_FAIL401_retries0"  # the API's 401: the lines a turn without credentials is made of
KEEP_WHEN_LOGGED_OUT = ("split", "block", "delay_ms", "init_delay_ms", "stderr")


def logged_out(knobs: dict[str, str]) -> bool:
    """This turn plays a CLI without credentials: FAKE_LOGGED_OUT=1, or the knob auth=none."""
    if knobs.get("auth", "none") != "none":
        fail(f"fake_claude: knob auth wants none, got {knobs['auth']!r}", 2)
    return env_number("FAKE_LOGGED_OUT", 0) != 0 or "auth" in knobs


def without_credentials(obj: dict[str, Any]) -> dict[str, Any]:
    """A line of recording g3 (a 401) as the real CLI writes it without credentials (g19, as the C fake has it)."""
    if obj.get("type") == "system" and obj.get("subtype") == "init":
        obj["apiKeySource"] = "none"
    elif obj.get("type") == "assistant":
        obj["message"]["content"] = [{"type": "text", "text": NOT_LOGGED_IN}]
        for key in ("request_id", "api_error_status", "api_error_type"):
            obj.pop(key, None)
    elif obj.get("type") == "result":
        obj.pop("api_error_type", None)
        obj.update(api_error_status=None, result=NOT_LOGGED_IN)
    return obj


AUTH_HELP = (
    "Usage: claude auth [options] [command]\n\nManage authentication\n\nCommands:\n"
    "  status [options]  Show authentication status\n"
)
AUTH_STATUS_HELP = (
    "Usage: claude auth status [options]\n\nShow authentication status\n\nOptions:\n"
    "  --json  Output as JSON (default)\n  --text  Output as human-readable text\n"
)


def auth_main(args: list[str]) -> NoReturn:
    """``claude auth status [--json|--text]``: see Credentials in the module's docstring."""
    RUN.record["mode"] = "auth"
    log_invocation()
    if not args or args[0] != "status":
        if args and args[0] in ("-h", "--help"):
            write_fd(1, AUTH_HELP.encode())
            finish(0)
        fail(f"fake_claude: only `auth status` is supported (got {' '.join(['auth', *args[:1]])})")
    text = False
    for arg in args[1:]:
        if arg in ("-h", "--help"):
            write_fd(1, AUTH_STATUS_HELP.encode())
            finish(0)
        if arg not in ("--json", "--text"):
            fail(f"error: unknown option '{arg}'")
        text = arg == "--text"
    env = os.environ
    has_key = bool(env.get("ANTHROPIC_API_KEY"))
    token = next((name for name in ("ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN") if env.get(name)), None)
    logged_in = env_number("FAKE_LOGGED_OUT", 0) == 0
    method = "none" if not logged_in else "api_key" if has_key else "oauth_token" if token else "api_key"
    key_source = None if not logged_in or (token and not has_key) else (
        "ANTHROPIC_API_KEY" if has_key else "/login managed key")
    code = 0 if logged_in else 1
    if text:
        if not logged_in:
            answer = "Not logged in. Run claude auth login to authenticate."
        else:
            answer = f"API key: {key_source}" if key_source else f"Auth token: {token}"
        write_fd(1, (answer + "\n").encode())
        finish(code)
    config = env.get("CLAUDE_CONFIG_DIR") or os.path.join(env.get("HOME", ""), ".claude")
    status: dict[str, Any] = {
        "loggedIn": logged_in,
        "authMethod": method,
        "apiProvider": "firstParty",
        "analyticsDisabled": bool(env.get("DISABLE_TELEMETRY") or env.get("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")),
        "projectsDirectory": os.path.join(config, "projects"),
        "configDirectory": config,
        "loginExpiresAt": None,
    }
    if key_source:
        status["apiKeySource"] = key_source
        if not has_key:
            status.update(email=None, orgId=None, orgName=None)
    write_fd(1, (json.dumps(status, indent=2, ensure_ascii=False) + "\n").encode())
    finish(code)


# ---------------------------------------------------------------- the turn


def abort(sid: str) -> NoReturn:
    """SIGINT: what recording g23 shows, then exit 0."""
    if not RUN.result_written and not RUN.silent:
        rec = Recording("g23_sigINT_midstream_hang")
        for line in rec.lines[1:]:
            RUN.out.line(rec.personalize(line, sid) + b"\n")
    finish(0)


def apply_knobs(scn: Scenario) -> None:
    """The knobs the signal handlers and the writer look at."""
    RUN.ignore_signals = scn.flag("ignore_signals")
    RUN.silent = scn.flag("no_init")
    RUN.out.mode = "block" if scn.flag("block") else "split" if scn.flag("split") else "line"


def run_turn(prompt: str, source: str, knobs: dict[str, str], sid: str, argv: list[str]) -> int:
    out = logged_out(knobs)
    if out:
        knobs = {key: value for key, value in knobs.items() if key in KEEP_WHEN_LOGGED_OUT}
    scn = Scenario(knobs)
    apply_knobs(scn)
    rec = Recording(AUTH_RECORDING if out else knobs.get("replay", DEFAULT_RECORDING))
    if out:
        rec.lines = [jdump(without_credentials(json.loads(line))) for line in rec.lines]
    RUN.result_written = False
    scale = env_number("FAKE_TIME_SCALE", 0.0)
    delay = scn.num("delay_ms") / 1000
    fake = jdump({"prompt": prompt, "argv": argv, "prompt_source": source})

    err(rec.stderr)
    err(knobs.get("stderr", "").replace("_", " "))
    if scn.flag("grandchild"):
        spawn_grandchild()

    times, wall = rec.times()
    lines = rec.lines
    init_at = next((i for i, line in enumerate(lines) if line.startswith(INIT_PREFIX)), None)
    tail_at = len(lines) - 1 if lines and b'"type":"result"' in lines[-1] else None
    head = 0 if init_at is None else init_at + 1
    body_end = len(lines) if tail_at is None else tail_at

    def gap(i: int) -> float:
        return scale * (times[i] - (times[i - 1] if i > 0 else 0.0))

    def emit(line: bytes, pause: float, piece: int = 0) -> None:
        nap(pause)
        if RUN.interrupted:
            abort(sid)
        if not RUN.silent:
            RUN.out.line(line + b"\n", piece)

    nap(scn.num("init_delay_ms") / 1000 + (gap(0) if lines else 0.0))
    for _ in range(scn.num("session_line", 1) - 1):
        emit(status_line(), 0)
    for i in range(head):
        emit(rec.personalize(lines[i], sid, fake), gap(i) if i else 0.0)
    if scn.num("giant") > 0:
        emit(assistant_line(0, scn.num("giant"), 0, sid), delay, MIB)
    if "lines" in knobs or "line_bytes" in knobs:
        count = scn.num("lines", 1)
        size = scn.num("line_bytes") if "line_bytes" in knobs else None
        for seq in range(1, count + 1):
            emit(assistant_line(seq, size, count, sid), delay)
    elif not (scn.flag("hang") or scn.flag("crash")):
        for i in range(head, body_end):
            emit(rec.personalize(lines[i], sid, fake), delay + (gap(i) if i else 0.0))
    if scn.flag("crash"):
        crash()
    if scn.flag("hang"):
        nap(float("inf"))
        abort(sid)
    code = scn.num("exit", 1 if RUN.silent else rec.exit_code)
    if tail_at is not None and not scn.flag("no_result"):
        line = rec.personalize(lines[tail_at], sid, fake)
        if code != 0:
            line = line.replace(b'"is_error":false', b'"is_error":true')
        emit(line, delay + gap(tail_at))
        RUN.result_written = True
    linger = (
        scn.num("result_then_linger_ms") / 1000
        if "result_then_linger_ms" in knobs
        else scale * (wall - (times[-1] if times else 0.0))
    )
    nap(linger)
    if RUN.interrupted:
        abort(sid)
    RUN.out.flush()
    return code


def stream_turns(sid: str, base: dict[str, str], argv: list[str]) -> int:
    """--input-format stream-json: one turn per user line on stdin, until EOF."""
    code, pending = 0, b""
    while True:
        chunk = os.read(0, MIB)
        pending += chunk
        while b"\n" in pending or (not chunk and pending.strip()):
            line, _, pending = pending.partition(b"\n")
            if not line.strip():
                continue
            try:
                message = json.loads(line)
                content = message["message"]["content"] if message.get("type") == "user" else None
            except (ValueError, KeyError, TypeError, AttributeError):
                fail(f"fake_claude: not a stream-json user message: {line[:200]!r}", 1)
            if content is None:
                continue
            if isinstance(content, list):
                content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            prompt = str(content)
            if not RUN.logged:
                RUN.record.update(prompt=prompt, prompt_source="stdin")
            code = run_turn(prompt, "stdin", {**base, **knobs_of(prompt, "the prompt")}, sid, argv)
        if not chunk:
            return code


# ---------------------------------------------------------------- SDK streaming mode

SDK_FIXTURES = os.environ.get("FAKE_SDK_FIXTURES_DIR") or os.path.join(HERE, "fixtures", "claude-cli-sdk")
SDK_INT_KNOBS = frozenset(
    (
        "lines",
        "line_bytes",
        "delay_ms",
        "init_delay_ms",
        "giant",
        "split",
        "block",
        "hang",
        "crash",
        "die",
        "no_result",
        "no_init",
        "exit",
        "ignore_signals",
        "ignore_interrupt",
        "grandchild",
        "tool_ms",
    )
)
SDK_STR_KNOBS = frozenset(("tool", "cmd", "reply", "stderr", "auth"))
PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")
EDIT_TOOLS = frozenset(("Write", "Edit", "MultiEdit", "NotebookEdit"))
INTERRUPTED = "[Request interrupted by user]"
NOT_GRANTED = "Claude requested permissions to use {}, but you haven't granted it yet."
# Recorded gaps in seconds (FAKE_TIME_SCALE multiplies them; 0 = none): warm turn 2 of s01_init_three_turns,
# the tool turn of s02a_cut_allow_updated_input, the interrupt of s03a_interrupt_slow.
SDK_GAPS = {
    "init": 0.027,  # user line -> system/init
    "assistant": 0.038,  # system/init -> assistant
    "result": 0.008,  # last assistant -> result
    "tool_use": 0.010,  # assistant text -> assistant tool_use
    "request": 0.041,  # tool_use -> can_use_tool
    "tool": 0.068,  # answer -> tool_result
    "final": 0.028,  # tool_result -> final assistant
    "abort": 0.005,  # interrupt response -> aborted lines
}


PARTIAL = "s03b_interrupt_hang_partial"  # the recording with --include-partial-messages
STREAM_CHUNK = 40  # characters per text delta: what the recordings' mock API sent (s03b)


class Aborted(Exception):
    """The running turn was interrupted (an ``interrupt`` request, SIGINT, or a deny with interrupt)."""


def line_kind(obj: dict[str, Any]) -> str:
    """``type/subtype``; for control lines the subtype of the request or response inside."""
    kind = obj.get("type")
    inner = obj.get({"control_response": "response", "control_request": "request"}.get(str(kind), ""))
    sub = inner.get("subtype") if isinstance(inner, dict) else obj.get("subtype")
    return f"{kind}/{sub}" if sub else str(kind)


_SDK_LINES: dict[str, list[tuple[str, str]]] = {}


def _json_inside(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def sdk_out_lines(name: str) -> list[tuple[str, str]]:
    """(kind, text) of every stdout line of SDK recording NAME, placeholders filled in for this run."""
    if name not in _SDK_LINES:
        try:
            with open(os.path.join(SDK_FIXTURES, name + ".jsonl"), encoding="utf-8") as f:
                data = f.read()
        except OSError:
            fail(f"fake_claude: no SDK recording named {name!r} in {SDK_FIXTURES}", 2)
        cwd = getcwd()
        fill = {
            "<WORKSPACE>": _json_inside(cwd),
            "<WORKSPACE_ENCODED>": re.sub(r"[^A-Za-z0-9]", "-", cwd),
            "<HOME>": _json_inside(os.environ.get("HOME", "/")),
            "<TMPDIR>": _json_inside(os.environ.get("CLAUDE_CODE_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"),
        }
        lines = []
        for raw in data.splitlines():
            event = json.loads(raw)
            if event.get("dir") == "out":
                text = re.sub(r"<[A-Z_]+>", lambda m: fill.get(m.group(0), m.group(0)), event["line"])
                lines.append((line_kind(json.loads(text)), text))
        _SDK_LINES[name] = lines
    return _SDK_LINES[name]


def tmpl(name: str, kind: str, nth: int = 0, has: str = "") -> dict[str, Any]:
    """A fresh copy of the nth stdout line of kind KIND (whose text contains HAS) of SDK recording NAME."""
    found = [text for k, text in sdk_out_lines(name) if k == kind and has in text]
    if len(found) <= nth:
        fail(f"fake_claude: recording {name} has no {kind} line #{nth} with {has!r}", 2)
    obj: dict[str, Any] = json.loads(found[nth])
    return obj


def with_key_after(obj: dict[str, Any], after: str, key: str, value: object) -> dict[str, Any]:
    """OBJ with KEY=VALUE placed right after AFTER (at the end if AFTER is missing), keeping the order."""
    if after not in obj:
        obj[key] = value
        return obj
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if k != key:
            out[k] = v
        if k == after:
            out[key] = value
    return out


def hex_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def split_tools(values: list[str] | None) -> list[str]:
    """Tool patterns as the CLI splits --allowedTools values: on commas and spaces outside parentheses."""
    out: list[str] = []
    for value in values or []:
        depth, cur = 0, ""
        for ch in value:
            if ch in ", " and depth == 0:
                if cur:
                    out.append(cur)
                cur = ""
                continue
            depth += (ch == "(") - (ch == ")")
            cur += ch
        if cur:
            out.append(cur)
    return out


def mock_reply(prompt: str) -> str:
    """What the recordings' mock API answered: ``MOCK-REPLY: <prompt> [len=N sha256=<16 hex>]``."""
    import hashlib

    digest = hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest()[:16]
    return f"MOCK-REPLY: {prompt} [len={len(prompt)} sha256={digest}]"


class UserMsg:
    def __init__(self, text: str, uuid: str | None, images: list[str | None]) -> None:
        self.text, self.uuid, self.images = text, uuid, images


class Pending:
    """The open can_use_tool request."""

    def __init__(self, line: dict[str, Any]) -> None:
        self.line = line
        self.id: str = line["request_id"]
        self.answer: dict[str, Any] | None = None  # the host's control_response.response
        self.closed = False  # stdin EOF came first
        self.cancelled = False


class Turn:
    def __init__(
        self,
        index: int,
        prompt: str,
        model_prompt: str,
        uuids: list[str],
        knobs: dict[str, str],
        images: list[str | None],
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.model_prompt = model_prompt
        self.uuids = uuids
        self.images = images
        self.knobs = knobs
        self.scn = Scenario(knobs)
        self.interrupted = False  # an interrupt request came
        self.tool_abort = False  # the abort ends a tool call (aborted_tools), not streaming
        self.tool_call: dict[str, Any] | None = None  # {"tool_name", "tool_use_id", "tool_input"} of the call
        self.tool_msg: tuple[str, str] = ("", "")  # message and request id of the tool_use lines
        self.unprinted: list[dict[str, Any]] = []  # tool_use blocks of that message not printed yet
        self.tool_running = False  # an allowed tool is running (tool_ms)
        self.denials: list[dict[str, Any]] = []
        self.calls = 0  # model calls (cost; num_turns unless set below)
        self.num_turns = 0  # after tools: 1 + one per tool_result (s02a: 2, s02g: 3)
        self.assistants = 0
        self.reply = ""
        self.lines_since_poll = 0
        self.ending = ""  # "max_turns" or "max_budget_usd": the turn stopped early (error result)
        self.stop_reason = "end_turn"  # of the last model call
        # --include-partial-messages: the message being streamed (stream_event lines)
        self.stream_ids: tuple[str, str] | None = None  # (message id, request id) between message_start and stop
        self.stream_blocks = 0  # content blocks started in it
        self.block_open = False  # a content block started, its content_block_stop not yet written
        self.streamed = ""  # the text deltas of the open block
        self.begun: list[str] = []  # ids of the messages streamed (the result's begun_message_ids)


class Sdk:
    """One CLI process in SDK streaming mode: JSON lines in on stdin, JSON lines out on stdout."""

    def __init__(self, opts: Opts, argv: list[str], sid: str, base: dict[str, str]) -> None:
        self._models: list[dict[str, Any]] | None = None
        self.argv = argv
        self.sid = sid
        self.base = base
        self.pid = os.getpid()
        self.refusal: tuple[str, str, str] | None = None  # (recording, session id, --resume value) at line 1
        self.stdio = opts.permission_prompt_tool == "stdio"
        self.allowed = split_tools(opts.allowed_tools)
        self.disallowed = split_tools(opts.disallowed_tools)
        self.skip = opts.skip_permissions
        self.mode = opts.permission_mode or ("bypassPermissions" if self.skip else "default")
        self.session_rules: set[str] = set()
        self.launch_model = self.resolve(opts.model)[0] if opts.model else "claude-opus-5-5"
        self.partial = opts.include_partial_messages
        self.max_turns = positive_int(opts.max_turns) if opts.max_turns is not None else None
        self.max_budget = positive_number(opts.max_budget_usd) if opts.max_budget_usd is not None else None
        self.schema = json_schema(opts)
        self.options: dict[str, Any] = {  # what turns.jsonl and system/init's "fake" key show
            "effort": opts.effort,
            "system_prompt": opts.system_prompt,
            "append_system_prompt": opts.append_system_prompt,
            "system_prompt_snapshot": opts.system_prompt_snapshot,
            "max_turns": self.max_turns,
            "max_budget_usd": self.max_budget,
            "json_schema": self.schema,
            "include_partial_messages": self.partial,
        }
        self.model = self.launch_model
        self.buf = b""
        self.eof = False
        self.queue: list[UserMsg] = []
        self.turn: Turn | None = None
        self.pending: Pending | None = None
        self.turns = 0
        self.results = 0
        self.total_cost = 0.0
        self.model_usage: dict[str, dict[str, Any]] = {}
        self.after_interrupt = False
        self.ignore_interrupt = False
        self.inits = 0
        self.seen_line = False
        self.startup_until = START + env_number("FAKE_STARTUP_MS", 0) / 1000
        self.scale = env_number("FAKE_TIME_SCALE", 0.0)
        self.session_recorded = False
        scn = Scenario(base)
        self.base_mode = "block" if scn.flag("block") else "split" if scn.flag("split") else "line"

    # ---- output

    def emit(self, obj: dict[str, Any]) -> None:
        RUN.out.line(jdump(obj) + b"\n")

    def respond(self, request_id: object, response: dict[str, Any]) -> None:
        self.emit(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": response},
            }
        )

    def respond_error(self, request_id: object, error: str, code: str) -> None:
        self.emit(
            {
                "type": "control_response",
                "response": {"subtype": "error", "request_id": request_id, "error": error, "error_code": code},
            }
        )

    def stamped(self, obj: dict[str, Any]) -> dict[str, Any]:
        """OBJ with this process's session id and a fresh uuid and timestamp where it has them."""
        if "session_id" in obj:
            obj["session_id"] = self.sid
        if "uuid" in obj:
            obj["uuid"] = new_uuid()
        if "timestamp" in obj:
            obj["timestamp"] = stamp().decode()
        return obj

    def lifecycle(self, uuid: str, state: str) -> None:
        line = tmpl("s04b_two_queued_with_uuid", "command_lifecycle")
        line.update(command_uuid=uuid, state=state)
        self.emit(self.stamped(line))

    # ---- input

    def poll(self, timeout: float | None) -> None:
        """Handle buffered lines, else wait up to TIMEOUT (None: for ever) for stdin or a signal."""
        if self.process_buffer():
            return
        RUN.out.flush()
        fds = [RUN.wake_fd] if self.eof else [RUN.wake_fd, 0]
        ready, _, _ = select.select(fds, [], [], timeout)
        if RUN.wake_fd in ready:
            try:
                os.read(RUN.wake_fd, 512)
            except OSError:
                pass
        if 0 in ready:
            try:
                chunk = os.read(0, MIB)
            except OSError:
                chunk = b""
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
                if self.pending is not None and self.pending.answer is None:
                    self.pending.closed = True
        self.process_buffer()

    def process_buffer(self) -> bool:
        """Handle complete lines; stop after a user message that an idle process must start a turn for."""
        did = False
        while not (self.turn is None and self.queue):
            cut = self.buf.find(b"\n")
            if cut >= 0:
                line, self.buf = self.buf[:cut], self.buf[cut + 1 :]
            elif self.eof and self.buf:
                line, self.buf = self.buf, b""
            else:
                break
            if not self.seen_line:
                self.first_line()
            self.handle_line(line)
            did = True
        return did

    def first_line(self) -> None:
        """Before the first answer: the simulated start-up, then a refused --resume."""
        self.seen_line = True
        nap(self.startup_until - time.monotonic())
        if RUN.interrupted and self.turn is None:
            finish(0)
        if self.refusal is not None:
            resume_refused(*self.refusal)

    def handle_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        append_state("stdin.jsonl", jdump({"pid": self.pid, "line": text}) + b"\n")
        if not text.strip():
            return
        try:
            msg = json.loads(text)
        except ValueError:
            err(f"Error parsing streaming input line (type=unknown, {len(text)} chars): SyntaxError")
            finish(1)
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "user":
            self.user_message(msg)
        elif kind == "control_request":
            self.control(msg)
        elif kind == "control_response":
            response = msg.get("response")
            pending = self.pending
            if (
                isinstance(response, dict)
                and pending is not None
                and response.get("request_id") == pending.id
                and pending.answer is None
                and not pending.closed
                and not pending.cancelled
            ):
                pending.answer = response
        # anything else (unknown types, keep_alive, ...) is ignored, like the real CLI (s10b)

    def user_message(self, msg: dict[str, Any]) -> None:
        message = msg.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        images: list[str | None] = []
        if isinstance(content, list):
            blocks = [b for b in content if isinstance(b, dict)]
            for block in blocks:
                if block.get("type") == "image":
                    source = block.get("source")
                    media_type = source.get("media_type") if isinstance(source, dict) else None
                    images.append(media_type if isinstance(media_type, str) else None)
            content = "\n".join(str(b.get("text", "")) for b in blocks if b.get("type", "text") == "text")
        if not isinstance(content, str):
            return
        uuid = msg.get("uuid") if isinstance(msg.get("uuid"), str) else None
        self.queue.append(UserMsg(content, uuid, images))
        if uuid:
            self.lifecycle(uuid, "queued")

    # ---- control requests from the host

    def control(self, msg: dict[str, Any]) -> None:
        rid = msg.get("request_id")
        request: dict[str, Any] = msg["request"] if isinstance(msg.get("request"), dict) else {}
        sub = request.get("subtype")
        if sub == "initialize":
            self.initialize(rid)
        elif sub == "interrupt":
            self.interrupt(rid, bool(request.get("cancel_queued")))
        elif sub == "set_permission_mode":
            self.set_permission_mode(rid, request.get("mode"))
        elif sub == "set_model":
            self.set_model(rid, request.get("model"))
        elif sub == "mcp_status":
            self.respond(rid, {"mcpServers": []})
        elif sub == "get_context_usage":
            line = tmpl("s05_set_mode_model_misc", "control_response/success", has='"categories"')
            self.respond(rid, line["response"]["response"])
        else:
            self.respond_error(rid, f"Unsupported control request subtype: {sub}", "unsupported_request")

    def initialize(self, rid: object) -> None:
        """s01_init_three_turns' answer (pid, mode, state of this process); a repeated one as in s01c/s02i."""
        self.inits += 1
        line = tmpl("s01_init_three_turns", "control_response/success")
        envelope = line["response"]
        envelope["request_id"] = rid
        body = envelope["response"]
        body.update(pid=self.pid, current_permission_mode=self.mode)
        if self.pending is not None:
            body["session_state"] = "requires_action"
            envelope["pending_permission_requests"] = [self.pending.line]
        elif self.turn is not None:
            body["session_state"] = "running"
        self.emit(line)
        if self.inits > 1:
            self.emit(self.stamped(tmpl("s01c_idle_before_first_message", "system/background_tasks_changed")))

    def interrupt(self, rid: object, cancel_queued: bool) -> None:
        """s03a/s03c/s02d/s04d: cancel an open permission request, answer, and end the running turn."""
        turn = self.turn
        if turn is None:
            self.respond(rid, {"still_queued": []})
            return
        if self.ignore_interrupt:
            self.respond(rid, {"still_queued": [m.uuid for m in self.queue if m.uuid]})
            return
        pending = self.pending
        if pending is not None and pending.answer is None and not pending.closed:
            pending.cancelled = True
            self.emit({"type": "control_cancel_request", "request_id": pending.id})
        queued = [m.uuid for m in self.queue if m.uuid]
        if cancel_queued:
            for uuid in queued:
                self.lifecycle(uuid, "cancelled")
            self.queue.clear()
            self.respond(rid, {"still_queued": [], "cancelled": queued})
        else:
            self.respond(rid, {"still_queued": queued})
        turn.interrupted = True

    def set_permission_mode(self, rid: object, mode: object) -> None:
        """s05_set_mode_model_misc, s05b_bypass_as_root."""
        if mode not in PERMISSION_MODES:
            self.respond_error(
                rid, "Cannot set permission mode: must be one of " + ", ".join(PERMISSION_MODES), "invalid_mode"
            )
            return
        if mode == "bypassPermissions" and not self.skip:
            self.respond_error(
                rid,
                "Cannot set permission mode to bypassPermissions because the session was not launched with "
                "--dangerously-skip-permissions",
                "bypass_not_launched",
            )
            return
        changed = mode != self.mode
        self.mode = str(mode)
        self.respond(rid, {"mode": mode})
        if changed:
            line = tmpl("s05_set_mode_model_misc", "system/status")
            line["permissionMode"] = mode
            self.emit(self.stamped(line))

    def models(self) -> list[dict[str, Any]]:
        """The ``models`` list of the recorded initialize answer."""
        if self._models is None:
            self._models = tmpl("s01_init_three_turns", "control_response/success")["response"]["response"]["models"]
        return self._models

    def known_models(self) -> set[str]:
        return {str(entry.get("resolvedModel")) for entry in self.models()}

    def resolve(self, name: str) -> tuple[str, str]:
        """(model id, how set_model shows it): aliases as the initialize answer's ``models`` list them."""
        for entry in self.models():
            if entry.get("value") == name and name != "default":
                return entry["resolvedModel"], f"{name} ({entry['resolvedModel']})"
        return name, name

    def set_model(self, rid: object, model: object) -> None:
        """s05_set_mode_model_misc: the isReplay user line, then {"model": <resolved>}."""
        if isinstance(model, str) and model and model != "default":
            self.model, shown = self.resolve(model)
        else:
            self.model = shown = self.launch_model
        line = tmpl("s05_set_mode_model_misc", "user", has='"isReplay"')
        line["message"]["content"] = f"<local-command-stdout>Set model to `{shown}`</local-command-stdout>"
        self.emit(self.stamped(line))
        self.respond(rid, {"model": self.model})

    # ---- the process

    def run(self) -> NoReturn:
        while True:
            if RUN.interrupted:
                finish(0)  # SIGINT while idle: exit 0, nothing printed (s07c)
            if self.turn is None and self.queue:
                self.run_turn()
                continue
            if self.eof and not self.buf:
                nap(0.04)  # the real CLI exits 30-75 ms after stdin EOF (s07a)
                finish(0)
            self.poll(None)

    def wait(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Let SECONDS pass (or until UNTIL() holds) while handling stdin; raise Aborted on an interrupt."""
        turn = self.turn
        deadline = time.monotonic() + seconds
        polled = False
        while True:
            if RUN.interrupted or (turn is not None and turn.interrupted):
                raise Aborted()
            if until is not None and until():
                return
            left = deadline - time.monotonic()
            if left <= 0 and polled:
                return
            self.poll(None if left == float("inf") else max(0.0, left))
            polled = True

    def gap(self, name: str, extra: float = 0.0) -> None:
        seconds = extra + self.scale * SDK_GAPS[name]
        turn = self.turn
        if seconds > 0:
            self.wait(seconds)
        elif turn is not None:
            turn.lines_since_poll += 1
            if self.buf or turn.lines_since_poll >= 32:  # stay responsive without a select per line
                turn.lines_since_poll = 0
                self.wait(0)

    def record_session(self) -> None:
        if not self.session_recorded:
            self.session_recorded = True
            path = state_path("sessions", self.sid)
            if path is not None:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(getcwd())

    def run_turn(self) -> None:
        msgs, self.queue = self.queue, []
        prompt = "\n".join(m.text for m in msgs)
        knobs = {**self.base, **knobs_of(prompt, "the prompt", SDK_INT_KNOBS, SDK_STR_KNOBS)}
        model_prompt = (INTERRUPTED + "\n\n" if self.after_interrupt else "") + prompt
        self.after_interrupt = False
        images = [media_type for m in msgs for media_type in m.images]
        turn = Turn(self.turns, prompt, model_prompt, [m.uuid for m in msgs if m.uuid], knobs, images)
        self.turns += 1
        self.turn = turn
        if not turn.scn.flag("no_init"):
            self.record_session()
        append_state(
            "turns.jsonl",
            jdump(
                {
                    "pid": self.pid,
                    "session_id": self.sid,
                    "prompt": prompt,
                    "turn": turn.index,
                    "allowed_tools": self.allowed,
                    "disallowed_tools": self.disallowed,
                    "skip_permissions": self.skip,
                    "permission_mode": self.mode,
                    "model": self.model,
                    "uuids": turn.uuids,
                    **self.options,
                    "images": turn.images,
                }
            )
            + b"\n",
        )
        scn = turn.scn
        if scn.flag("ignore_signals"):
            RUN.ignore_signals = True  # from this turn on, for the rest of the process
        if scn.flag("ignore_interrupt"):
            self.ignore_interrupt = True
        if scn.flag("no_init"):
            err(knobs.get("stderr", "").replace("_", " "))
            finish(scn.num("exit", 1))
        RUN.out.mode = "block" if scn.flag("block") else "split" if scn.flag("split") else "line"
        err(knobs.get("stderr", "").replace("_", " "))
        if scn.flag("grandchild"):
            spawn_grandchild()
        for uuid in turn.uuids:
            self.lifecycle(uuid, "started")
        try:
            self.turn_body(turn)
            state = "completed"
        except Aborted:
            self.abort_turn(turn)
            state = "cancelled"
        self.pending = None
        self.turn = None
        for uuid in turn.uuids:
            self.lifecycle(uuid, state)
        RUN.out.flush()
        RUN.out.mode = self.base_mode
        if RUN.interrupted:
            finish(0)  # SIGINT during a turn: its aborted result, then exit 0 (s07e)

    # ---- lines of a turn

    def init_line(self, turn: Turn) -> dict[str, Any]:
        """system/init of s01_init_three_turns, or of s02a (AskUserQuestion, plan-mode tools) with stdio."""
        line = tmpl("s02a_cut_allow_updated_input" if self.stdio else "s01_init_three_turns", "system/init")
        tools = line["tools"]
        if self.model not in self.known_models():  # s05: claude-haiku-4-5 gets the task-list tools
            at = tools.index("TaskStop")
            tools[at : at + 1] = ["TaskCreate", "TaskGet", "TaskList", "TaskStop", "TaskUpdate"]
        line.update(
            session_id=self.sid,
            tools=[t for t in tools if t not in self.disallowed],
            model=self.model,
            permissionMode=self.mode,
            uuid=new_uuid(),
        )
        tmp = os.environ.get("CLAUDE_CODE_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        line["messaging_socket_path"] = f"{tmp}/cc-socks/{self.pid}.sock"
        if turn.uuids:
            line["user_message_uuids"] = turn.uuids
        line["fake"] = {
            "prompt": turn.prompt,
            "argv": self.argv,
            "pid": self.pid,
            "turn": turn.index,
            **self.options,
            "images": turn.images,
        }
        return line

    def assistant(
        self, turn: Turn, content: list[dict[str, Any]], ids: tuple[str, str] | None = None, last: bool = True
    ) -> None:
        """An assistant line of one content block. With --include-partial-messages it comes between the block's
        content_block_start/deltas and its content_block_stop, the message's first block after message_start, its
        LAST block followed by message_delta and message_stop (s03b, i1)."""
        msg_id, req_id = ids or (hex_id("msg_"), hex_id("req_"))
        if self.partial:
            self.stream_block(turn, (msg_id, req_id), content[0])
        line = tmpl("s01_init_three_turns", "assistant")
        line["message"].update(id=msg_id, model=self.model, content=content)
        line["request_id"] = req_id
        self.emit(self.uuid_keys(turn, self.stamped(line)))
        if self.partial:
            self.stream_close_block(turn)
            if last:
                self.stream_stop(turn)
        self.assistant_written(turn)

    # ---- --include-partial-messages (s03b_interrupt_hang_partial, i1_partial_messages)

    def requesting(self) -> None:
        """The ``system/status`` ``requesting`` line before each model call."""
        if self.partial:
            self.emit(self.stamped(tmpl(PARTIAL, "system/status")))

    def stream_line(self, turn: Turn, has: str, nth: int = 0, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """s03b's NTH stream_event line with HAS, for the open message (EVENT in place of the recorded one)."""
        line = self.stamped(tmpl(PARTIAL, "stream_event", nth, has))
        if event is not None:
            line["event"] = event
        line["api_message_id"] = turn.stream_ids[0] if turn.stream_ids else None
        return line

    def stream_block(self, turn: Turn, ids: tuple[str, str], block: dict[str, Any], whole: bool = True) -> None:
        """message_start (for a message's first block), content_block_start and the block's deltas: its text in
        STREAM_CHUNK-character pieces (the recordings' mock API), only the first piece unless WHOLE."""
        if turn.stream_ids is None:
            turn.stream_ids, turn.stream_blocks = ids, 0
            turn.begun.append(ids[0])
            line = self.stream_line(turn, '"message_start"')
            line["event"]["message"].update(id=ids[0], model=self.model)
            self.emit(line)
        index = turn.stream_blocks
        turn.stream_blocks += 1
        if block.get("type") == "tool_use":  # not recorded: the API's tool_use streaming, input in one delta
            start: dict[str, Any] = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
            text, delta = jdump(block.get("input", {})).decode(), ("input_json_delta", "partial_json")
        else:
            start, text, delta = {"type": "text", "text": ""}, str(block.get("text", "")), ("text_delta", "text")
        event = {"type": "content_block_start", "index": index, "content_block": start}
        self.emit(self.stream_line(turn, '"content_block_start"', event=event))
        turn.block_open, turn.streamed = True, ""
        pieces = [text[i : i + STREAM_CHUNK] for i in range(0, len(text), STREAM_CHUNK)]
        if delta[0] == "input_json_delta":
            pieces = [text]
        for piece in pieces if whole else pieces[:1]:
            event = {"type": "content_block_delta", "index": index, "delta": {"type": delta[0], delta[1]: piece}}
            self.emit(self.stream_line(turn, '"content_block_delta"', event=event))
            turn.streamed += piece

    def stream_close_block(self, turn: Turn) -> None:
        if turn.block_open:
            turn.block_open = False
            event = {"type": "content_block_stop", "index": turn.stream_blocks - 1}
            self.emit(self.stream_line(turn, '"content_block_stop"', event=event))

    def stream_stop(self, turn: Turn, aborted: bool = False) -> None:
        """The open block's content_block_stop, then message_delta and message_stop; after an interrupt s03b's
        aborted message_delta and a message_stop with ``abandoned_blocks``."""
        if turn.stream_ids is None:
            return
        self.stream_close_block(turn)
        if aborted:
            self.emit(self.stream_line(turn, '"message_delta"', 0))
            line = self.stream_line(turn, '"message_stop"', 0)
            line["abandoned_blocks"] = {"api_message_id": turn.stream_ids[0], "from_block_index": turn.stream_blocks}
        else:
            line = self.stream_line(turn, '"message_delta"', 1)
            line["event"]["delta"]["stop_reason"] = turn.stop_reason
            self.emit(line)
            line = self.stream_line(turn, '"message_stop"', 1)
        self.emit(line)
        turn.stream_ids = None

    def assistant_written(self, turn: Turn) -> None:
        turn.assistants += 1
        if turn.assistants == 1 and "die" in turn.knobs:
            finish(turn.scn.num("die"))

    def uuid_keys(self, turn: Turn, line: dict[str, Any]) -> dict[str, Any]:
        if turn.uuids:
            line["user_message_uuid"] = turn.uuids[-1]
            line["user_message_uuids"] = turn.uuids
        return line

    def turn_body(self, turn: Turn) -> None:
        scn = turn.scn
        delay = scn.num("delay_ms") / 1000
        self.gap("init", scn.num("init_delay_ms") / 1000)
        if logged_out(turn.knobs):
            self.logged_out_turn(turn)
            return
        self.emit(self.init_line(turn))
        turn.calls = 1
        self.requesting()
        if scn.num("giant") > 0:
            self.gap("assistant", delay)
            RUN.out.line(assistant_line(0, scn.num("giant"), 0, self.sid) + b"\n", MIB)
            self.assistant_written(turn)
        generated = "lines" in turn.knobs or "line_bytes" in turn.knobs
        if generated:
            count = scn.num("lines", 1)
            size = scn.num("line_bytes") if "line_bytes" in turn.knobs else None
            for seq in range(1, count + 1):
                self.gap("assistant", delay)
                RUN.out.line(assistant_line(seq, size, count, self.sid) + b"\n")
                self.assistant_written(turn)
        if scn.flag("crash"):
            crash()
        if scn.flag("hang"):
            if self.partial and not generated:  # s03b: the mock streamed its first piece, then hung
                reply = turn.knobs.get("reply", "").replace("_", " ") or mock_reply(turn.model_prompt)
                self.gap("assistant", delay)
                self.stream_block(turn, (hex_id("msg_"), hex_id("req_")), {"type": "text", "text": reply}, False)
            self.wait(float("inf"))
        tools = [name for name in turn.knobs.get("tool", "").split(",") if name]
        if tools:
            self.tool_round(turn, tools, delay)
        else:
            turn.reply = turn.knobs.get("reply", "").replace("_", " ") or mock_reply(turn.model_prompt)
            if not generated:
                self.gap("assistant", delay)
                self.assistant(turn, [{"type": "text", "text": turn.reply}])
        if not turn.ending and self.over_budget(turn):
            turn.ending = "max_budget_usd"
        self.gap("result", delay)
        if scn.flag("no_result"):
            finish(0)
        if turn.ending:
            self.result(turn, self.stopped_result(turn))
            return
        with_uuids = "s04b_two_queued_with_uuid" if turn.uuids else "s01_init_three_turns"
        self.result(turn, tmpl(with_uuids, "result/success"))

    def logged_out_turn(self, turn: Turn) -> None:
        """The turn of a CLI without credentials (see Credentials): system/init, the synthetic assistant line
        and an error result that costs nothing."""
        delay = turn.scn.num("delay_ms") / 1000
        self.emit(without_credentials(self.init_line(turn)))
        rec = Recording(AUTH_RECORDING)
        assistant, result = (without_credentials(json.loads(rec.lines[i])) for i in (1, 2))
        assistant["message"]["id"] = new_uuid()
        self.gap("assistant", delay)
        self.emit(self.uuid_keys(turn, self.stamped(assistant)))
        self.gap("result", delay)
        result = self.stamped(result)
        result.update(total_cost_usd=self.total_cost or 0, result_index=self.results)  # JSON's 0, not 0.0
        if turn.uuids:
            result = with_key_after(result, "uuid", "user_message_uuid", turn.uuids[-1])
            result = with_key_after(result, "user_message_uuid", "user_message_uuids", turn.uuids)
        self.emit(result)
        self.results += 1

    def cost_per_call(self) -> float:
        cost: float = tmpl("s01_init_three_turns", "result/success")["total_cost_usd"]
        return cost

    def over_budget(self, turn: Turn) -> bool:
        """--max-budget-usd: the process's total_cost_usd with this turn's model calls so far exceeds it."""
        return self.max_budget is not None and self.total_cost + self.cost_per_call() * turn.calls > self.max_budget

    def stopped_result(self, turn: Turn) -> dict[str, Any]:
        """A turn stopped by --max-turns: the result line of i6_max_turns_1_tool (print mode: SDK mode is not
        recorded). By --max-budget-usd (not recorded at all): the same line with subtype error_max_budget_usd."""
        line: dict[str, Any] = json.loads(Recording("i6_max_turns_1_tool").lines[-1])
        line.update(num_turns=turn.num_turns or max(1, turn.calls), stop_reason=turn.stop_reason)
        if turn.ending == "max_turns":
            line["errors"] = [f"Reached maximum number of turns ({self.max_turns})"]
        else:
            line.update(
                subtype="error_max_budget_usd",
                terminal_reason="max_budget_usd",
                errors=[f"Reached maximum budget (${self.max_budget})"],
            )
        return line

    def result(self, turn: Turn, line: dict[str, Any]) -> None:
        """RESULT (a recorded result line) with this turn's numbers: result_index, cumulative cost."""
        per_call = tmpl("s01_init_three_turns", "result/success")["total_cost_usd"]
        cost = per_call * max(1, turn.calls)
        self.total_cost += cost
        usage = next(iter(line["modelUsage"].values()))
        mine = self.model_usage.setdefault(
            self.model, {**usage, "costUSD": 0.0, "inputTokens": 0, "outputTokens": 0, "canonicalModel": self.model}
        )
        mine["costUSD"] += cost
        mine["inputTokens"] += usage["inputTokens"]
        mine["outputTokens"] += usage["outputTokens"]
        line.update(
            session_id=self.sid,
            total_cost_usd=self.total_cost,
            modelUsage={name: dict(entry) for name, entry in self.model_usage.items()},
            permission_denials=turn.denials,
            num_turns=(turn.num_turns or max(1, turn.calls)) if line.get("subtype") == "success" else line["num_turns"],
            uuid=new_uuid(),
            result_index=self.results,
            model_usage_since_last_result={self.model: {**usage, "costUSD": cost, "canonicalModel": self.model}},
        )
        if "result" in line:
            line["result"] = turn.reply
        if self.partial:  # s03b, i1
            line = with_key_after(line, "uuid", "begun_message_ids", turn.begun)
        if turn.uuids and "user_message_uuid" in line:  # s04b's result line
            line.update(user_message_uuid=turn.uuids[-1], user_message_uuids=turn.uuids)
        elif turn.uuids:  # the key places of s04d_interrupt_cancel_queued
            line = with_key_after(line, "errors", "user_message_uuid", turn.uuids[-1])
            line = with_key_after(line, "uuid", "user_message_uuids", turn.uuids)
        if self.schema is not None and line.get("subtype") == "success":  # a guess: not recorded
            line = with_key_after(line, "result", "structured_output", schema_instance(self.schema))
        self.emit(line)
        self.results += 1

    def abort_turn(self, turn: Turn) -> None:
        """The end of an interrupted turn: s03a (streaming) or s02b2/s02d (a tool call)."""
        kill_grandchildren()
        pending = self.pending
        if pending is not None and pending.answer is None and not pending.cancelled and not pending.closed:
            pending.cancelled = True  # SIGINT while a permission request is open: cancel it like an interrupt
            self.emit({"type": "control_cancel_request", "request_id": pending.id})
        self.pending = None
        scale_gap = self.scale * SDK_GAPS["abort"]
        if scale_gap > 0:
            time.sleep(scale_gap)
        if turn.tool_abort or turn.tool_call is not None and not turn.reply:
            call = turn.tool_call or {}
            # s03d: stopped while running (no denial); s02b2/s02d: refused before it ran
            name = "s03d_interrupt_during_bash" if turn.tool_running else "s02b2_cut_deny_interrupt"
            line = tmpl(name, "user", has='"tool_result"')
            line["message"]["content"][0]["tool_use_id"] = call.get("tool_use_id")
            line["tool_result_meta"][0]["id"] = call.get("tool_use_id")
            self.emit(self.stamped(line))
            if call and call not in turn.denials and not turn.tool_running:
                turn.denials.append(call)
            self.emit(self.stamped(tmpl(name, "user", has="for tool use]")))
            self.stream_stop(turn, aborted=True)
            self.result(turn, tmpl(name, "result/error_during_execution"))
            return
        if turn.block_open and turn.stream_ids is not None:  # s03b: the text streamed so far
            (msg_id, req_id), text = turn.stream_ids, turn.streamed
        else:
            reply = turn.reply or mock_reply(turn.model_prompt)
            (msg_id, req_id), text = (hex_id("msg_"), hex_id("req_")), reply[: max(1, len(reply) // 2)]
        line = tmpl("s03a_interrupt_slow", "assistant")
        line["message"].update(id=msg_id, model=self.model, content=[{"type": "text", "text": text}])
        line["request_id"] = req_id
        self.emit(self.uuid_keys(turn, self.stamped(line)))
        self.emit(self.stamped(tmpl("s03a_interrupt_slow", "user", has=INTERRUPTED)))
        self.stream_stop(turn, aborted=True)
        self.result(turn, tmpl("s03a_interrupt_slow", "result/error_during_execution"))
        self.after_interrupt = True

    # ---- tools

    def tool_input(self, name: str, cmd: str, nth: int, several: bool) -> dict[str, Any]:
        """The input of a call of NAME; for Bash, NTH counts the Bash calls before it in the message."""
        if name == "Bash":
            if cmd and nth == 0:
                return {"command": cmd, "description": "mock command"}
            if several:  # s02g: echo one > one.txt, then echo two > two.txt
                line = tmpl("s02g_cut_two_tools", "assistant", min(nth, 1), has='"type":"tool_use"')
            else:
                line = tmpl("s02a_cut_allow_updated_input", "assistant", has='"type":"tool_use"')
            return dict(line["message"]["content"][0]["input"])
        if name == "AskUserQuestion":
            line = tmpl("s09_ask_user_question", "assistant", has='"type":"tool_use"')
            return dict(line["message"]["content"][0]["input"])
        if name in EDIT_TOOLS:
            return {"file_path": os.path.join(getcwd(), "file.txt"), "content": "written by the fake\n"}
        return {}

    def allowed_without_asking(self, name: str) -> str | None:
        """How a tool call is allowed without a request: "rule", "mode", or None (ask or deny)."""
        if name == "AskUserQuestion":
            return None
        if name in self.allowed or name in self.session_rules:
            return "rule"
        if self.mode == "bypassPermissions" or (self.mode == "acceptEdits" and name in EDIT_TOOLS):
            return "mode"
        return None

    def tool_round(self, turn: Turn, names: list[str], delay: float) -> None:
        """assistant text + one tool_use per tool (one message); each call's permission decision and tool_result
        in turn, one can_use_tool at a time (s02g); the final assistant line."""
        cmd = turn.knobs.get("cmd", "").replace("_", " ")
        calls = [
            {
                "tool_name": name,
                "tool_use_id": hex_id("toolu_"),
                "tool_input": self.tool_input(name, cmd, names[:i].count("Bash"), len(names) > 1),
            }
            for i, name in enumerate(names)
        ]
        turn.tool_msg = (hex_id("msg_"), hex_id("req_"))
        turn.stop_reason = "tool_use"
        self.gap("assistant", delay)
        self.assistant(turn, [{"type": "text", "text": f"I will use {', '.join(names)}."}], turn.tool_msg, False)
        turn.unprinted = [
            {"type": "tool_use", "id": c["tool_use_id"], "name": c["tool_name"], "input": c["tool_input"]}
            for c in calls
        ]
        if self.over_budget(turn):  # a guess: the tools do not run
            self.print_tool_uses(turn, delay)
            turn.ending = "max_budget_usd"
            return
        self.print_tool_uses(turn, delay, keep=len(calls) - 1)
        results = [self.decide(turn, call, delay) for call in calls]
        turn.num_turns = 1 + len(calls)
        if self.max_turns is not None and self.max_turns < 2:  # i6: the tools ran, the next call is not made
            turn.ending = "max_turns"
            return
        turn.calls = 2
        turn.stop_reason = "end_turn"
        turn.reply = turn.knobs.get("reply", "").replace("_", " ") or "MOCK-FINAL after tool: " + json.dumps(
            [{"id": c["tool_use_id"], "is_error": e, "content": t} for c, (t, e) in zip(calls, results, strict=True)]
        )
        self.requesting()
        self.gap("final", delay)
        self.assistant(turn, [{"type": "text", "text": turn.reply}])

    def print_tool_uses(self, turn: Turn, delay: float, keep: int = 0) -> None:
        """The message's tool_use lines not printed yet, but the last KEEP: the first call's can_use_tool comes
        before the second tool_use line (s02g)."""
        while len(turn.unprinted) > keep:
            self.gap("tool_use", delay)
            self.assistant(turn, [turn.unprinted.pop(0)], turn.tool_msg, not turn.unprinted)

    def decide(self, turn: Turn, call: dict[str, Any], delay: float) -> tuple[str, bool]:
        """One call's permission decision and tool_result: (content, is_error)."""
        name, tool_use_id, tool_input = call["tool_name"], call["tool_use_id"], call["tool_input"]
        turn.tool_call = call
        how = self.allowed_without_asking(name)
        if name not in self.disallowed and how is None and self.stdio and self.mode != "dontAsk":
            return self.ask(turn, name, tool_use_id, tool_input, delay)
        self.print_tool_uses(turn, delay)  # a call not asked about: the message's other tool_use lines first
        if name in self.disallowed:
            self.gap("tool")
            return self.tool_error(
                turn,
                tool_use_id,
                f"<tool_use_error>Error: No such tool available: {name}</tool_use_error>",
                "s02f_cut_bare_allow",
                "Tool permission request failed",
                denial=False,
            )
        if how is not None:
            self.gap("tool")
            return self.tool_ran(turn, name, tool_use_id, tool_input, {"source": "config", "reason": how})
        return self.auto_deny(turn, name, tool_use_id, tool_input)

    def ask(
        self, turn: Turn, name: str, tool_use_id: str, tool_input: dict[str, Any], delay: float
    ) -> tuple[str, bool]:
        """The can_use_tool request (s02a; s09 for AskUserQuestion), then what the host's answer leads to."""
        if name == "AskUserQuestion":
            line = tmpl("s09_ask_user_question", "control_request/can_use_tool")
            line["request"].update(input=tool_input, tool_use_id=tool_use_id)
        else:
            line = tmpl("s02a_cut_allow_updated_input", "control_request/can_use_tool")
            request = line["request"]
            request.update(tool_name=name, display_name=name, input=tool_input, tool_use_id=tool_use_id)
            request["description"] = tool_input.get("description", name)
            command = str(tool_input.get("command", ""))
            target = re.search(r">\s*(\S+)", command)
            prefix = " ".join(re.split(r"[;&|<>]", command)[0].split()[:2])
            suggestions = request["permission_suggestions"]
            if name == "Bash" and prefix:
                suggestions[0]["rules"] = [{"toolName": name, "ruleContent": prefix + " *"}]
            else:
                suggestions[0]["rules"] = [{"toolName": name}]
            path = target.group(1) if target else tool_input.get("file_path")
            if path:
                request["blocked_path"] = os.path.join(getcwd(), str(path))
            else:
                del request["blocked_path"]
                del suggestions[1:]
        line["request_id"] = new_uuid()
        self.gap("request")
        self.emit(line)
        pending = self.pending = Pending(line)
        pending.closed = self.eof  # stdin already closed: no answer can come
        append_state(
            "permissions.jsonl",
            jdump({"pid": self.pid, "turn": turn.index, "request_id": pending.id, "tool_name": name}) + b"\n",
        )
        self.print_tool_uses(turn, delay)
        self.wait(float("inf"), until=lambda: pending.answer is not None or pending.closed)
        self.pending = None
        self.gap("tool", delay)
        if pending.answer is None:  # stdin EOF first (s07f)
            return self.tool_error(
                turn,
                tool_use_id,
                "Tool permission request failed: AbortError: Tool permission stream closed before response received",
                "s07f_eof_pending_permission",
                "Tool permission request failed",
            )
        answer = pending.answer
        decision: dict[str, Any] = answer["response"] if isinstance(answer.get("response"), dict) else {}
        if answer.get("subtype") == "error":  # s02f
            return self.tool_error(
                turn,
                tool_use_id,
                f"Tool permission request failed: Error: {answer.get('error')}",
                "s02f_cut_bare_allow",
                "Tool permission request failed",
            )
        if decision.get("behavior") == "allow":
            used = decision.get("updatedInput")
            used = used if isinstance(used, dict) else tool_input
            for update in decision.get("updatedPermissions") or []:
                if isinstance(update, dict) and update.get("type") == "addRules" and update.get("behavior") == "allow":
                    for rule in update.get("rules") or []:
                        if isinstance(rule, dict) and not rule.get("ruleContent") and rule.get("toolName"):
                            self.session_rules.add(str(rule["toolName"]))
            return self.tool_ran(turn, name, tool_use_id, used, {"source": "user_temporary"})
        if decision.get("behavior") == "deny" and decision.get("interrupt"):  # s02b2
            turn.tool_abort = True
            raise Aborted()
        message = decision.get("message") if decision.get("behavior") == "deny" else "Invalid permission response"
        line = tmpl("s02b_cut_deny_message", "user", has='"tool_result"')
        text = str(message if message is not None else "")
        line["message"]["content"][0].update(content=text, tool_use_id=tool_use_id)
        line["tool_use_result"] = "Error: " + text
        line["tool_result_meta"][0]["id"] = tool_use_id
        self.emit(self.stamped(line))
        turn.denials.append(turn.tool_call or {})
        return text, True

    def tool_error(
        self, turn: Turn, tool_use_id: str, text: str, name: str, has: str, denial: bool = True
    ) -> tuple[str, bool]:
        """An error tool_result shaped like recording NAME's (s02f, s07f), counted as a denial."""
        line = tmpl(name, "user", has=has)
        line["message"]["content"][0].update(content=text, tool_use_id=tool_use_id)
        line["tool_use_result"] = "Error: " + text
        line["tool_result_meta"][0]["id"] = tool_use_id
        self.emit(self.stamped(line))
        if denial:
            turn.denials.append(turn.tool_call or {})
        return text, True

    def tool_ran(
        self, turn: Turn, name: str, tool_use_id: str, used: dict[str, Any], decision: dict[str, str]
    ) -> tuple[str, bool]:
        """The tool "ran" (nothing is executed; it takes tool_ms): s02a's Bash tool_result, s09's AskUserQuestion
        one."""
        if turn.scn.num("tool_ms") > 0:
            turn.tool_running = True
            self.wait(turn.scn.num("tool_ms") / 1000)
            turn.tool_running = False
        if decision.get("reason"):
            meta = {"decision": "accept", "source": "config", "reason_type": decision["reason"]}
        else:
            meta = {"decision": "accept", "source": "user_temporary"}
        if name == "AskUserQuestion":
            line = tmpl("s09_ask_user_question", "user", has='"tool_result"')
            answers: dict[str, Any] = used["answers"] if isinstance(used.get("answers"), dict) else {}
            pairs = ", ".join(f'"{q}"="{a}"' for q, a in answers.items())
            content = f"Your questions have been answered: {pairs}. You can now continue with these answers in mind."
            line["message"]["content"][0].update(content=content, tool_use_id=tool_use_id)
            line["tool_use_result"] = used
        else:
            line = tmpl("s02a_cut_allow_updated_input", "user", has='"tool_result"')
            content = "(Bash completed with no output)" if name == "Bash" else f"({name} completed with no output)"
            line["message"]["content"][0].update(content=content, tool_use_id=tool_use_id)
            if name != "Bash":
                line["tool_use_result"] = {}
        line["tool_result_meta"] = [{"id": tool_use_id, "permission_decision": meta}]
        self.emit(self.stamped(line))
        append_state(
            "tools.jsonl",
            jdump({"pid": self.pid, "turn": turn.index, "tool_name": name, "tool_use_id": tool_use_id, "input": used})
            + b"\n",
        )
        return content, False

    def auto_deny(self, turn: Turn, name: str, tool_use_id: str, tool_input: dict[str, Any]) -> tuple[str, bool]:
        """No --permission-prompt-tool stdio: system/permission_denied and an error tool_result (s02h)."""
        command = str(tool_input.get("command", ""))
        target = re.search(r">\s*(\S+)", command)
        if name == "Bash" and target:
            cwd = getcwd()
            text = tmpl("s02h_no_ppt_tool_use", "system/permission_denied")["message"]
            text = text.replace(os.path.join(cwd, "file.txt"), os.path.join(cwd, target.group(1)))
        else:
            text = NOT_GRANTED.format(name)
        self.gap("tool")
        line = tmpl("s02h_no_ppt_tool_use", "system/permission_denied")
        line.update(tool_name=name, tool_use_id=tool_use_id, message=text)
        self.emit(self.stamped(line))
        line = tmpl("s02h_no_ppt_tool_use", "user", has='"tool_result"')
        line["message"]["content"][0].update(content=text, tool_use_id=tool_use_id)
        line["tool_use_result"] = "Error: " + text
        line["tool_result_meta"][0]["id"] = tool_use_id
        self.emit(self.stamped(line))
        turn.denials.append(turn.tool_call or {})
        return text, True


def session_id_flag(opts: Opts) -> str | None:
    """--session-id: the real CLI's checks (s11c; the other two texts are from the C fake's notes)."""
    given = opts.session_id
    if given is None:
        return None
    if not UUID_RE.fullmatch(given):
        fail("Error: Invalid session ID. Must be a valid UUID.")
    if opts.resume_given and not opts.fork_session:
        fail("Error: --session-id can only be used with --continue or --resume if --fork-session is also specified.")
    path = state_path("sessions", given)
    if path is not None and os.path.exists(path):
        RUN.record["session_id"] = given
        fail(f"Error: Session ID {given} is already in use.")
    return given


def sdk_main(opts: Opts, full_argv: list[str]) -> NoReturn:
    """SDK streaming mode: no -p, --input-format stream-json."""
    base = env_knobs(SDK_INT_KNOBS, SDK_STR_KNOBS)
    RUN.record["scenario"] = base
    RUN.ignore_signals = Scenario(base).flag("ignore_signals")
    sid = session_id_flag(opts) or new_uuid()
    refusal: tuple[str, str, str] | None = None
    if opts.resume_given:
        given = opts.resume or ""
        RUN.record["resume"] = given
        known_path = state_path("sessions", given) if UUID_RE.fullmatch(given) else None
        if not UUID_RE.fullmatch(given):
            refusal = ("b5_resume_malformed", sid, given)
        elif known_path is not None and not os.path.isfile(known_path):
            refusal = ("b4_resume_unknown_uuid", given, given)
        elif not opts.fork_session and opts.session_id is None:
            sid = given
    RUN.record["session_id"] = refusal[1] if refusal else sid
    log_invocation()
    sdk = Sdk(opts, full_argv, sid, base)
    RUN.out.mode = sdk.base_mode
    sdk.refusal = refusal
    if refusal is None and opts.resume_given:
        sdk.session_recorded = sid == opts.resume
    sdk.run()


# ---------------------------------------------------------------- main


def json_schema(opts: Opts) -> dict[str, Any] | None:
    """--json-schema, parsed; a value that is not a JSON object is refused (a guess: the text is not recorded)."""
    if opts.json_schema is None:
        return None
    try:
        schema = json.loads(opts.json_schema)
    except ValueError as e:
        fail(f"Error: Invalid JSON in --json-schema: {e}")
    if not isinstance(schema, dict):
        fail("Error: Invalid JSON in --json-schema: a JSON Schema must be an object")
    return schema


def schema_instance(schema: object) -> object:
    """The simplest value SCHEMA allows (a guess at what the model returns): the first enum value or the const;
    objects get every property (required or not), strings "MOCK", numbers 0, booleans false, arrays []."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_instance(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "object":
        props = schema.get("properties")
        return {k: schema_instance(v) for k, v in props.items()} if isinstance(props, dict) else {}
    return {"string": "MOCK", "number": 0, "integer": 0, "boolean": False, "array": []}.get(str(kind))


def resume_refused(name: str, sid: str, value: str) -> NoReturn:
    """Recordings b4/b5 with ``value`` for the recorded --resume value: stderr, one result line, exit 1."""
    rec = Recording(name)
    words = str(rec.meta["argv"]).split()
    recorded = words[words.index("--resume") + 1]
    err(rec.stderr.replace(recorded, value))
    line = rec.personalize(rec.lines[0], sid).replace(jstr(recorded), jstr(value))
    RUN.out.line(line + b"\n")
    finish(rec.exit_code)


def main(argv: list[str]) -> NoReturn:
    setup_signals()
    full_argv = [os.fsencode(a).decode("utf-8", "replace") for a in argv]
    cwd = getcwd()
    env: dict[str, str | None] = {k: v for k, v in os.environ.items() if k.startswith(("CLAUDESRV_", "FAKE_MARK"))}
    env.update(IS_SANDBOX=os.environ.get("IS_SANDBOX"), CLAUDE_CONFIG_DIR=os.environ.get("CLAUDE_CONFIG_DIR"))
    RUN.record = {
        "argv": full_argv,
        "started_at": time.time(),
        "cwd": cwd,
        "prompt": None,
        "prompt_source": None,
        "stdin_kind": None,
        "stdin_timed_out": False,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "env": env,
        "scenario": {},
        "session_id": None,
        "resume": None,
    }
    if full_argv[1:2] == ["auth"]:
        auth_main(full_argv[2:])
    opts = parse_argv(full_argv[1:])
    if any(a in ("-h", "--help") for a in opts.unknown):
        log_invocation()
        with open(os.path.join(FIXTURES, "e1_prompt_dashdash_help.jsonl"), "rb") as f:
            write_fd(1, f.read())
        finish(0)
    if opts.unknown:
        fail(f"error: unknown option '{opts.unknown[0]}'")
    json_schema(opts)  # refuses a value that is not a JSON object
    sdk = not opts.print_mode and opts.input_format == "stream-json"
    RUN.record["mode"] = "sdk" if sdk else "print"
    if not opts.print_mode and not sdk:
        fail("fake_claude: only print mode (-p) and SDK streaming mode (--input-format stream-json) exist", 2)
    if sdk and opts.output_format != "stream-json":
        fail("Error: --input-format=stream-json requires output-format=stream-json.")
    if opts.output_format == "stream-json" and not opts.verbose:
        fail(MSG_NEEDS_VERBOSE)
    if opts.output_format != "stream-json":
        fail(f"fake_claude: only --output-format stream-json is supported, not {opts.output_format!r}", 2)
    bypass = opts.skip_permissions or opts.permission_mode == "bypassPermissions"
    if bypass and os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
        refusal = Recording("c1_dsp_root")
        fail(refusal.stderr, refusal.exit_code)
    if sdk:
        sdk_main(opts, full_argv)

    base = env_knobs()
    RUN.record["scenario"] = base
    apply_knobs(Scenario(base))

    prompt, source = "", ""
    if opts.input_format != "stream-json":
        arg = os.fsencode(opts.operands[0]) if opts.operands and opts.operands[0] else None
        data, kind, timed_out = read_stdin(int(env_number("FAKE_STDIN_WAIT_MS", 3000)))
        RUN.record.update(stdin_kind=kind, stdin_timed_out=timed_out)
        if data and arg is not None:
            raw, source = arg + b"\n" + data, "both"
        elif data:
            raw, source = data, "stdin"
        elif arg is not None:
            raw, source = arg, "arg"
        else:
            if opts.swallowed:
                value, option = opts.swallowed
                err(
                    f'"{value}" was read as a value of {option}, not as a prompt · '
                    f"put a prompt before {option} or after --"
                )
            fail(MSG_NO_INPUT)
        prompt = raw.decode("utf-8", "replace")
        RUN.record.update(prompt=prompt, prompt_source=source)
        if not prompt.replace("\ufeff", "").strip():
            fail(MSG_WHITESPACE)
        base = {**base, **knobs_of(prompt, "the prompt")}
        RUN.record["scenario"] = base
    apply_knobs(Scenario(base))

    sid = new_uuid()
    if opts.resume_given:
        given = opts.resume or ""
        RUN.record["resume"] = given
        if not UUID_RE.fullmatch(given):
            RUN.record["session_id"] = sid
            resume_refused("b5_resume_malformed", sid, given)
        known_path = state_path("sessions", given)
        if known_path is not None and not os.path.isfile(known_path):
            RUN.record["session_id"] = given
            resume_refused("b4_resume_unknown_uuid", given, given)
        if not opts.fork_session and base.get("new_id", "0") == "0":
            sid = given
    flagged = session_id_flag(opts)
    if flagged is not None:
        sid = flagged
    RUN.record["session_id"] = sid
    session_file = state_path("sessions", sid)
    if session_file is not None and not RUN.silent:
        with open(session_file, "w", encoding="utf-8") as f:
            f.write(cwd)

    if opts.input_format == "stream-json":
        finish(stream_turns(sid, base, full_argv))
    finish(run_turn(prompt, source, base, sid, full_argv))


if __name__ == "__main__":
    main(sys.argv)
