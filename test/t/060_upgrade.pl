
# ALTER EXTENSION nocrm_automation UPDATE from 1.0 to 1.1, 1.2 and 1.3, on a
# database in use: the data stays as it was, automations and the drain keep
# working, the roles and owner-rights triggers of 1.1 are there (an agent
# gets automations without reading rules or the queue, or writing history),
# 1.2's gated event triggers work for an agent too, and the result is the
# same catalog as a fresh CREATE EXTENSION of 1.2.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('upgrade');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->start;

sub sq
{
	my ($sql, %opts) = @_;
	my $db = delete $opts{db} // 'postgres';
	return $node->safe_psql($db, $sql, %opts);
}

# Runs $sql as $role, expecting an error; returns "SQLSTATE: message".
sub sql_error
{
	my ($role, $sql) = @_;
	my ($out, $err);
	my $rc = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		extra_params => [ '-U', $role ], on_error_stop => 1,
		stdout => \$out, stderr => \$err);
	return "no error (exit $rc)" if $rc == 0;
	my ($line) = $err =~ /^(?:psql:[^\n]*?)?ERROR:  ([^\n]+)/m;
	return $line // $err;
}

# Every table's row count and md5 of its ordered rows, and the sequences.
sub data_digest
{
	return sq(<<'SQL');
DO $$
DECLARE
    t regclass;
    d text;
BEGIN
    CREATE TEMP TABLE digest (name text, value text);
    FOR t IN SELECT c.oid FROM pg_class c
              WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r' ORDER BY c.relname LOOP
        EXECUTE format($q$SELECT count(*) || ' ' || coalesce(md5(string_agg(x::text, E'\n' ORDER BY x::text)), '-')
                          FROM %s x$q$, t) INTO d;
        INSERT INTO digest VALUES (t::text, d);
    END LOOP;
    INSERT INTO digest SELECT 'sequence ' || sequencename, coalesce(last_value::text, 'unused')
      FROM pg_sequences WHERE schemaname = 'nocrm';
END $$;
SELECT name || ': ' || value FROM digest ORDER BY name;
SQL
}

# Like data_digest, but only the tables and columns that exist now, so that
# an update that adds columns or tables can be checked to keep every value:
# call it before the update, then again with the columns it returned.
sub columns_now
{
	return sq(q{SELECT string_agg(format('%s.%s', c.relname, a.attname), ',' ORDER BY c.relname, a.attnum)
	              FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
	             WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r'
	               AND a.attnum > 0 AND NOT a.attisdropped});
}

sub data_digest_of
{
	my ($columns, $without_template) = @_;
	$without_template //= '';
	return sq(<<SQL);
DO \$\$
DECLARE
    t text;
    d text;
    cols text[] := string_to_array('$columns', ',');
BEGIN
    CREATE TEMP TABLE digest (name text, value text);
    FOR t IN SELECT DISTINCT split_part(c, '.', 1) FROM unnest(cols) c ORDER BY 1 LOOP
        EXECUTE format(\$q\$SELECT count(*) || ' ' || coalesce(md5(string_agg(r, E'\\n' ORDER BY r)), '-')
                          FROM (SELECT (SELECT string_agg(coalesce(v, 'NULL'), '|' ORDER BY ord)
                                          FROM unnest(%L::text[]) WITH ORDINALITY k(col, ord)
                                          LEFT JOIN LATERAL (SELECT j ->> col AS v) vv ON true) AS r
                                  FROM (SELECT to_jsonb(x) AS j FROM nocrm.%I x) rows
                                 WHERE NOT (%L = 'email_templates' AND j ->> 'name' = %L)) s\$q\$,
                       (SELECT array_agg(split_part(c, '.', 2)) FROM unnest(cols) c WHERE split_part(c, '.', 1) = t), t,
                       t, '$without_template')
          INTO d;
        INSERT INTO digest VALUES (t, d);
    END LOOP;
    -- the sequences of those tables (a new table's is new)
    INSERT INTO digest SELECT 'sequence ' || sequencename, coalesce(last_value::text, 'unused')
      FROM pg_sequences WHERE schemaname = 'nocrm'
       AND regexp_replace(sequencename, '_id_seq\$', '') IN (SELECT split_part(c, '.', 1) FROM unnest(cols) c);
END \$\$;
SELECT name || ': ' || value FROM digest ORDER BY name;
SQL
}

# The extension's catalog, by name: members, functions (signature, language,
# security, settings, privileges, definition digest), relations, columns,
# triggers, constraints, indexes, views, comments, dump configuration,
# initial privileges, the schema and the settings' privileges.
my $catalog_sql = <<'SQL';
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'nocrm_automation'),
members AS (SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
             WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM members
UNION ALL
SELECT format('function %s(%s) returns %s language=%s kind=%s secdef=%s volatile=%s strict=%s config=%s acl=%s def=%s',
              p.oid::regproc, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
              l.lanname, p.prokind, p.prosecdef, p.provolatile, p.proisstrict, p.proconfig, p.proacl,
              md5(pg_get_functiondef(p.oid)))
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'nocrm'::regnamespace
UNION ALL
SELECT format('relation %s kind=%s acl=%s', c.oid::regclass, c.relkind, c.relacl)
  FROM pg_class c WHERE c.relnamespace = 'nocrm'::regnamespace
UNION ALL
SELECT format('column %s.%s %s notnull=%s default=%s identity=%s acl=%s', a.attrelid::regclass, a.attname,
              format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
              a.attidentity, a.attacl)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'nocrm'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT format('trigger %s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'nocrm'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT format('constraint %s on %s: %s', co.conname, co.conrelid::regclass, pg_get_constraintdef(co.oid))
  FROM pg_constraint co WHERE co.connamespace = 'nocrm'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = 'nocrm'::regnamespace
UNION ALL
SELECT format('view %s: %s', c.oid::regclass, md5(pg_get_viewdef(c.oid)))
  FROM pg_class c WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'v'
UNION ALL
SELECT format('comment %s: %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), md5(d.description))
  FROM pg_description d WHERE (d.classoid, d.objoid) IN (SELECT classid, objid FROM members)
UNION ALL
SELECT format('dump %s %s', c::regclass, e.extcondition[i])
  FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS x(c, i) WHERE e.extname = 'nocrm_automation'
UNION ALL
SELECT format('init_privs %s %s %s', pg_describe_object(ip.classoid, ip.objoid, ip.objsubid), ip.privtype, ip.initprivs)
  FROM pg_init_privs ip WHERE (ip.classoid, ip.objoid) IN (SELECT classid, objid FROM members)
UNION ALL
SELECT format('schema %s owner=%s acl=%s', n.nspname, n.nspowner::regrole, n.nspacl)
  FROM pg_namespace n WHERE n.nspname = 'nocrm'
UNION ALL
SELECT format('extension %s %s relocatable=%s schema=%s', e.extname, e.extversion, e.extrelocatable,
              e.extnamespace::regnamespace)
  FROM pg_extension e WHERE e.extname = 'nocrm_automation'
UNION ALL
SELECT format('parameter %s %s', parname, paracl) FROM pg_parameter_acl WHERE parname LIKE 'nocrm.%'
ORDER BY 1
SQL

# --- 1.0 ----------------------------------------------------------------------

sq(q{CREATE EXTENSION nocrm_automation VERSION '1.0'});
is(sq(q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}), '1.0', 'installed at 1.0');
is(sq(q{SELECT count(*) FROM pg_roles WHERE rolname IN ('nocrm_admin', 'nocrm_agent')}), 0,
	'1.0 has no roles');
is(sq(q{SELECT prosecdef FROM pg_proc WHERE oid = 'nocrm.lead_event_trigger'::regproc}), 'f',
	'1.0 triggers run with the caller\'s rights');

sq(<<'SQL');
INSERT INTO nocrm.users (name, email) VALUES
  ('Anna', 'anna@example.com'), ('Matteo', 'matteo@example.com'), ('Giovanni', 'giovanni@example.com');
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite');
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (1, 'Nuovo', 1), (1, 'Qualificato', 2), (1, 'Preventivo', 3);
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('welcome', 'Ciao {{lead.title}}', 'Benvenuto');
SELECT nocrm.create_automation(name => 'Vendite', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "add_tags", "tags": ["Nuovo"]},
               {"type": "comment", "body": "Benvenuto a bordo"},
               {"type": "add_tags", "tags": ["Da richiamare"], "delay": "1 second"}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Preventivo', kind => 'tag_added',
  params => '{"tag": "Hot"}');
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 1', 1);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 2', 1);
INSERT INTO nocrm.tags (lead_id, name) VALUES (2, 'Hot');
SQL

is( sq(q{SELECT string_agg(l.title || ' ' || u.name || ' ' || s.name || ' ' ||
	           (SELECT string_agg(t.name, ',' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = l.id) || ' ' ||
	           (SELECT count(*) FROM nocrm.comments c WHERE c.lead_id = l.id AND c.user_id = 0), '; ' ORDER BY l.id)
	      FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id JOIN nocrm.steps s ON s.id = l.step_id}),
	'Lead 1 Anna Nuovo Nuovo 1; Lead 2 Matteo Preventivo Hot,Nuovo 1',
	'1.0: the automation assigns in turn, tags and comments; the stage trigger moves Lead 2');
is(sq(q{SELECT count(*) FROM nocrm.queue WHERE state = 'pending' AND kind = 'action'}), 2,
	'1.0: two delayed actions are pending');
cmp_ok(sq(q{SELECT count(*) FROM nocrm.lead_history WHERE actor_id = 0 AND event LIKE 'action.%'}), '>=', 6,
	'1.0: the Butler\'s actions are in the history');

my $data_before = data_digest();

# --- the update ------------------------------------------------------------------

sq(q{ALTER EXTENSION nocrm_automation UPDATE TO '1.1'});
is(sq(q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}), '1.1', 'updated to 1.1');
is(data_digest(), $data_before, 'every table\'s rows and every sequence are unchanged by the update');

is( sq(q{SELECT string_agg(rolname || ' login=' || rolcanlogin, ', ' ORDER BY rolname)
	       FROM pg_roles WHERE rolname IN ('nocrm_admin', 'nocrm_agent')}),
	'nocrm_admin login=false, nocrm_agent login=false', 'roles nocrm_admin and nocrm_agent exist, without login');
is(sq(q{SELECT pg_has_role('nocrm_admin', 'nocrm_agent', 'MEMBER')}), 't', 'nocrm_admin is a member of nocrm_agent');

my $trigger_functions = sq(q{
	SELECT string_agg(DISTINCT p.oid::regproc::text, ' ')
	  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
	 WHERE c.relnamespace = 'nocrm'::regnamespace AND NOT t.tgisinternal});
cmp_ok(scalar(split / /, $trigger_functions), '>=', 14, 'the trigger functions of the extension (14 in 1.1)')
  or diag $trigger_functions;
is( sq(q{
	SELECT coalesce(string_agg(DISTINCT p.oid::regproc::text || ' ' || p.prosecdef || ' ' || coalesce(p.proconfig::text, '-'), ', '), '')
	  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
	 WHERE c.relnamespace = 'nocrm'::regnamespace AND NOT t.tgisinternal
	   AND NOT (p.prosecdef AND p.proconfig = '{"search_path=pg_catalog, pg_temp"}')}),
	'', 'every one is SECURITY DEFINER with search_path = pg_catalog, pg_temp');
is( sq(q{
	SELECT coalesce(string_agg(p.oid::regprocedure::text, ', '), '')
	  FROM pg_proc p WHERE p.pronamespace = 'nocrm'::regnamespace AND p.prosecdef
	   AND p.proconfig IS DISTINCT FROM '{"search_path=pg_catalog, pg_temp"}'}),
	'', 'so is every other SECURITY DEFINER function (fire_trigger, lead_timeline)');
is( sq(q{SELECT count(*) FROM pg_extension e, unnest(e.extconfig) c
	      WHERE e.extname = 'nocrm_automation' AND (SELECT relkind FROM pg_class WHERE oid = c) = 'S'}),
	13, 'the identity sequences are now dumped with the data');

# --- behaviour after the update ------------------------------------------------------

sq(q{INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 3', 1)});
is( sq(q{SELECT u.name || ' ' || (SELECT string_agg(t.name, ',' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = l.id)
	           || ' ' || (SELECT count(*) FROM nocrm.comments c WHERE c.lead_id = l.id AND c.user_id = 0)
	      FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Lead 3'}),
	'Giovanni Nuovo 1', '1.1: the automation still fires on a new lead (Giovanni\'s turn, tag, comment)');
is(sq(q{SELECT id FROM nocrm.leads WHERE title = 'Lead 3'}), 3, 'the lead id follows on');

$node->poll_query_until('postgres',
	q{SELECT count(*) = 0 FROM nocrm.queue WHERE state = 'pending' AND run_at > now()})
  or die 'the delayed actions did not fall due';
sq('CALL nocrm.drain(0)');
is(sq(q{SELECT string_agg(state, ',' ORDER BY id) FROM nocrm.queue}), 'done,done,done',
	'the drain runs the delayed actions queued under 1.0 and 1.1');
is( sq(q{SELECT count(*) FROM nocrm.tags WHERE name = 'Da richiamare'}), 3,
	'each lead got its delayed tag');

# --- an agent ------------------------------------------------------------------

sq('CREATE ROLE regress_agent LOGIN IN ROLE nocrm_agent');
my $anna = sq(q{SELECT id FROM nocrm.users WHERE name = 'Anna'});
my $history_max = sq('SELECT max(id) FROM nocrm.lead_history');
is( sq(q{SET nocrm.actor = 'anna@example.com';
	     INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('By the agent', 1);
	     SELECT count(*) FROM nocrm.leads WHERE title = 'By the agent'}, extra_params => [ '-U', 'regress_agent' ]),
	1, 'the agent inserts a lead');
my $agent_lead = sq(q{SELECT id FROM nocrm.leads WHERE title = 'By the agent'});
is( sq("SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.id = $agent_lead"),
	'Anna', 'the automation assigned it (round robin: Anna)');
is( sq("SELECT string_agg(event || ':' || coalesce(actor_id::text, '-') || ':' || coalesce(automation_id::text, '-'), ' ' ORDER BY id)
	      FROM nocrm.lead_history WHERE lead_id = $agent_lead AND event IN ('lead.creation', 'action.assign_round_robin', 'action.comment')"),
	"lead.creation:$anna:- action.assign_round_robin:0:1 action.comment:0:1",
	'history: the agent\'s change (actor Anna) and the Butler\'s actions, written with the owner\'s rights');
cmp_ok(sq("SELECT min(id) FROM nocrm.lead_history WHERE lead_id = $agent_lead"), '>', $history_max,
	'new history rows');
is(sq("SELECT count(*) FROM nocrm.queue WHERE lead_id = $agent_lead AND state = 'pending'"), 1,
	'and its delayed action is queued');
is( sq("SELECT count(*) FROM nocrm.lead_history WHERE lead_id = $agent_lead", extra_params => [ '-U', 'regress_agent' ]),
	sq("SELECT count(*) FROM nocrm.lead_history WHERE lead_id = $agent_lead"),
	'the agent reads the history');
is( sq("INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES ($agent_lead, $anna, 'Chiamato');
	    SELECT count(*) FROM nocrm.comments WHERE lead_id = $agent_lead AND user_id = $anna",
		extra_params => [ '-U', 'regress_agent' ]),
	1, 'the agent comments as a person');

like(sql_error('regress_agent', 'SELECT count(*) FROM nocrm.automations'),
	qr/^42501: permission denied for table automations/, 'the agent cannot read nocrm.automations');
like(sql_error('regress_agent', 'SELECT count(*) FROM nocrm.queue'),
	qr/^42501: permission denied for table queue/, 'nor nocrm.queue');
like(sql_error('regress_agent', "INSERT INTO nocrm.lead_history (lead_id, event) VALUES ($agent_lead, 'lead.won')"),
	qr/^42501: permission denied for table lead_history/, 'the agent cannot write history');
like(sql_error('regress_agent', "INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES ($agent_lead, 0, 'I am the Butler')"),
	qr/^42501: only automations comment as The Butler/, 'nor comment as the Butler (user 0)');
is(sq("SELECT count(*) FROM nocrm.comments WHERE body = 'I am the Butler'"), 0, 'no such comment was written');

# --- 1.1 -> 1.2: gated event triggers ------------------------------------------------

my $data_1_1 = data_digest();
sq(q{ALTER EXTENSION nocrm_automation UPDATE TO '1.2'});
is(sq(q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}), '1.2', 'updated to 1.2');
is(data_digest(), $data_1_1, 'the update to 1.2 leaves every row and sequence as it was');
is( sq(q{SELECT string_agg(tgname || ' ' || coalesce(tgoldtable, '-') || ' ' || coalesce(tgnewtable, '-'), ', ' ORDER BY tgname)
	       FROM pg_trigger
	      WHERE tgrelid = 'nocrm.leads'::regclass AND NOT tgisinternal AND tgfoid = 'nocrm.lead_statement_trigger'::regproc
	        AND tgtype & 1 = 0}),
	'nocrm_lead_events_delete old_rows -, nocrm_lead_events_insert - new_rows, nocrm_lead_events_update old_rows new_rows',
	'the lead events come from statement triggers with transition tables');
is( sq(q{SELECT string_agg(c.relname || '.' || t.tgname, ' ' ORDER BY c.relname, t.tgname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
	      WHERE c.relnamespace = 'nocrm'::regnamespace AND NOT t.tgisinternal AND t.tgqual IS NOT NULL
	        AND t.tgname LIKE '%events%'}),
	'comments.nocrm_comment_events emails.nocrm_email_events tags.nocrm_tag_events_delete tags.nocrm_tag_events_insert tags.nocrm_tag_events_update',
	'the tag, comment and email event triggers have WHEN gates');
is(sq(q{SELECT prosecdef FROM pg_proc WHERE oid = 'nocrm.lead_before_trigger'::regproc}), 'f',
	'the BEFORE trigger runs as the caller');
# history = actions (set by the superuser for the role): the gate decides, not history.
sq(q{ALTER ROLE regress_agent SET nocrm.history = actions});
sq(q{INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Agent lead 1.2', 1)},
	extra_params => [ '-U', 'regress_agent' ]);
sq(q{ALTER ROLE regress_agent RESET nocrm.history});
is(sq(q{SELECT user_id IS NOT NULL FROM nocrm.leads WHERE title = 'Agent lead 1.2'}),
	't', '1.2: an agent\'s new lead passes the gate (loaded as the owner) and is assigned');

# --- 1.2 -> 1.3 ------------------------------------------------------------------------

# The working-time functions become C: the same answers on the same data
# (hours in two time zones, lunch, a weekend, DST, an absence, no hours, an
# unknown user), while no company calendar exists.
sq(<<'SQL');
UPDATE nocrm.users SET timezone = 'Europe/Rome' WHERE email = 'anna@example.com';
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
  SELECT u.id, d, h.s, h.e FROM nocrm.users u, generate_series(1, 5) d,
         (VALUES (time '09:00', time '13:00'), ('14:00', '18:00')) h(s, e) WHERE u.email = 'anna@example.com';
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason)
  SELECT id, '2027-03-30 00:00+02', '2027-04-01 12:00+02', 'ferie' FROM nocrm.users WHERE email = 'anna@example.com';
SQL
my $working_sql = q{SELECT string_agg(u.id || ' ' || t || ' ' || nocrm.is_working(u.id, t) || ' ' || nocrm.next_working_time(u.id, t),
                                      E'\n' ORDER BY u.id, t)
                      FROM (SELECT id FROM nocrm.users UNION ALL SELECT 999) u,
                           generate_series(timestamptz '2027-03-25 00:00+00', '2027-04-02 00:00+00', interval '97 minutes') t};
my $working_1_2 = sq($working_sql);
like($working_1_2, qr/ true 2027-/, '1.2: someone works sometimes');
like($working_1_2, qr/ false 2027-/, '1.2: someone is off sometimes');
# automation_stats counts firings from nocrm.firing_counts in 1.3, seeded
# from the run log's fired rows: the same figures before and after.
my $stats_sql = q{SELECT string_agg(concat_ws(' ', id, fired, last_fired, avg_actions), E'\n' ORDER BY id)
                    FROM nocrm.automation_stats};
my $stats_1_2 = sq($stats_sql);
like($stats_1_2, qr/^\d+ [1-9]\d* \d{4}-/m, '1.2: some automation has fired');
my $columns_1_2 = columns_now();
my $data_1_2 = data_digest_of($columns_1_2);
like($data_1_2, qr/^leads: [1-9][0-9]* [0-9a-f]{32}$/m, 'the 1.2 data digest covers the rows');
note($data_1_2);
sq(q{ALTER EXTENSION nocrm_automation UPDATE TO '1.3'});
is(sq(q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}), '1.3', 'updated to 1.3');
# (1.3 adds the seeded template "alert" and the sequences of its new tables)
my %seen_1_2 = map { (split /: /)[0] => 1 } split /\n/, $data_1_2;
is(join("\n", grep { $seen_1_2{ (split /: /)[0] } } split /\n/, data_digest_of($columns_1_2, 'alert')),
	$data_1_2, 'the update to 1.3 leaves every row and sequence as it was');
is(sq(q{SELECT count(*) FROM nocrm.automations
         WHERE position <> 0 OR stop_processing OR once_per_lead OR at_most_every IS NOT NULL OR on_creation}),
	0, '1.3: the automations keep their behaviour (options at their defaults)');
is(sq($stats_sql), $stats_1_2, '1.3: automation_stats counts the firings the run log had');
is(sq($working_sql), $working_1_2, '1.3: is_working and next_working_time give 1.2\'s answers (no company calendar)');
is(sq(q{SELECT (SELECT count(*) FROM nocrm.business_calendar) + (SELECT count(*) FROM nocrm.business_hours)
                + (SELECT count(*) FROM nocrm.holidays)}), 0, '1.3: the company calendar starts empty');
# Tasks on the updated database: a new rule's create_task, version 1 of it.
sq(q{SELECT nocrm.create_automation(name => 'Richiamare', event => 'lead.commented',
       actions => '[{"type": "create_task", "title": "Richiamare {{lead.title}}", "due": "1 day"}]')});
sq(q{INSERT INTO nocrm.comments (lead_id, body) SELECT min(id), 'Ciao' FROM nocrm.leads});
is( sq(q{SELECT count(*) FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id
          WHERE t.title = 'Richiamare ' || l.title AND t.created_by = 0 AND t.rule_version = 1
            AND t.due_at = t.created_at + interval '1 day'}),
	1, '1.3: create_task makes a task on the updated database');

# --- a fresh CREATE EXTENSION is the same ---------------------------------------------

sq('CREATE DATABASE fresh');
sq('CREATE EXTENSION nocrm_automation', db => 'fresh');
is(sq(q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}, db => 'fresh'), '1.3',
	'a fresh CREATE EXTENSION installs 1.3');
my @updated = split /\n/, sq($catalog_sql);
my @fresh = split /\n/, sq($catalog_sql, db => 'fresh');
cmp_ok(scalar(grep { /^member / } @fresh), '>', 80, 'the fresh install has its members');
cmp_ok(scalar(grep { /^function .* secdef=t / } @fresh), '>=', 15, 'and its SECURITY DEFINER functions');
my %in_fresh = map { $_ => 1 } @fresh;
my %in_updated = map { $_ => 1 } @updated;
is_deeply([ grep { !$in_fresh{$_} } @updated ], [], 'nothing in the updated catalog that a fresh install lacks');
is_deeply([ grep { !$in_updated{$_} } @fresh ], [], 'nothing in a fresh install that the update lacks');
is(scalar(@updated), scalar(@fresh), sprintf('the same %d catalog entries', scalar @fresh));

# --- 1.0 + updates and a fresh install have the same data -------------------------

# Every table of a database that only ever had the extension (what CREATE
# EXTENSION made, its timestamps aside) and every sequence.
sub bare_digest
{
	my ($db) = @_;
	return sq(<<'SQL', db => $db);
SELECT string_agg(name || ': ' || value, E'\n' ORDER BY name) FROM (
  SELECT c.oid::regclass::text AS name,
         (xpath('/row/d/text()', query_to_xml(format(
            $q$SELECT count(*) || ' ' || coalesce(md5(string_agg(j::text, E'\n' ORDER BY j::text)), '-') AS d
                 FROM (SELECT to_jsonb(x) - 'created_at' - 'updated_at' AS j FROM %s x) y$q$, c.oid::regclass),
            false, true, '')))[1]::text AS value
    FROM pg_class c WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r'
  UNION ALL
  SELECT 'sequence ' || sequencename, coalesce(last_value::text, 'unused')
    FROM pg_sequences WHERE schemaname = 'nocrm') s
SQL
}
sq('CREATE DATABASE bare');
sq(q{CREATE EXTENSION nocrm_automation VERSION '1.0'}, db => 'bare');
sq(q{ALTER EXTENSION nocrm_automation UPDATE}, db => 'bare');
my $fresh_data = bare_digest('fresh');
like($fresh_data, qr/^nocrm.users: 1 [0-9a-f]{32}$/m, 'a fresh install has the Butler');
is(bare_digest('bare'), $fresh_data, '1.0 + updates: the same rows and sequences as a fresh install');

# Seeded rows changed before the update are kept for the next dump.
sq('CREATE DATABASE renamed');
sq(q{CREATE EXTENSION nocrm_automation VERSION '1.2'}, db => 'renamed');
sq(q{SELECT nocrm.set_butler('Alfred', 'alfred@example.com');
     UPDATE nocrm.email_templates SET body = 'Nuovo {{message}}' WHERE name = 'notification'}, db => 'renamed');
sq(q{ALTER EXTENSION nocrm_automation UPDATE}, db => 'renamed');
is( sq(q{SELECT string_agg(seed || ' ' || (value = nocrm.seeded_row(seed)), ', ' ORDER BY seed) FROM nocrm.seeded_rows},
		db => 'renamed'),
	'alert_template true, butler true, notification_template true',
	'1.2 -> 1.3 keeps the Butler and the notification template changed before it in nocrm.seeded_rows, and the alert template from then on');
is(sq('SELECT count(*) FROM nocrm.seeded_rows', db => 'bare'), 0, 'and nothing for a database that changed neither');

$node->stop;
done_testing();
