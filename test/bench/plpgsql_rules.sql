-- plpgsql_rules.sql — a hand-written PL/pgSQL implementation of the rule set
-- (b) of engine_bench.sh, on the same nocrm tables, writing the same rows the
-- engine writes for these rules (lead_history per event and per action,
-- automation_runs per firing, notifications + pg_notify, queue rows, tags,
-- round-robin counters).  Used by engine_bench.sh only; not part of the
-- extension.  The triggers are created DISABLED: the bench enables them for
-- the plpgsql variant, with the extension's own triggers disabled
-- (ALTER TABLE ... DISABLE TRIGGER USER).
--
-- The rules are hard-coded (what a hand-written implementation would do),
-- with the ids the bench gives them (automations loaded after TRUNCATE ...
-- RESTART IDENTITY, in this order):
--   1 notify on creation      lead.creation          notify Sara (user 4)
--   2 notify on deletion      lead.deleted           notify Sara
--   3 round robin             lead.creation  {pipeline Vendite(1), owner null} users 1,2,3
--   4 balanced                lead.creation  {pipeline Onboarding(2), owner null} users 1,2,3
--   5 Preventivo follow-up    lead.step.changed.to Preventivo {pipeline Vendite}
--                             send_email quote_followup + add_tags "Preventivo inviato"
--   6 won -> upsell           lead.status.changed.to won: add_tags "Upsell Opportunity"
-- Vendite's Preventivo is step 3.
--
-- Competent: assignment in the BEFORE trigger (no second UPDATE of the
-- lead), all history rows of one row change in one INSERT, no dynamic SQL.

CREATE TABLE IF NOT EXISTS public.bench_rr_counters (
    grp       integer NOT NULL,          -- the automation id
    user_id   bigint  NOT NULL,
    position  integer NOT NULL,
    assigned  bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, user_id)
);
INSERT INTO public.bench_rr_counters (grp, user_id, position)
VALUES (3, 1, 0), (3, 2, 1), (3, 3, 2), (4, 1, 0), (4, 2, 1), (4, 3, 2)
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION public.bench_lead_before() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pick bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW IS NOT DISTINCT FROM OLD THEN
            RETURN NEW;
        END IF;
        IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
            NEW.updated_at := now();
        END IF;
        IF NEW.pipeline_id IS DISTINCT FROM OLD.pipeline_id
           AND NEW.step_id IS NOT DISTINCT FROM OLD.step_id THEN
            NEW.step_id := NULL;
        END IF;
    END IF;
    -- bookkeeping: first step, closed_at
    IF NEW.pipeline_id IS NOT NULL AND NEW.step_id IS NULL THEN
        SELECT s.id INTO NEW.step_id FROM nocrm.steps s
         WHERE s.pipeline_id = NEW.pipeline_id ORDER BY s.position LIMIT 1;
    ELSIF NEW.step_id IS NOT NULL AND NEW.pipeline_id IS NULL THEN
        SELECT s.pipeline_id INTO NEW.pipeline_id FROM nocrm.steps s WHERE s.id = NEW.step_id;
    END IF;
    IF NEW.status IN ('won', 'lost', 'cancelled') THEN
        IF NEW.closed_at IS NULL
           OR (TG_OP = 'UPDATE' AND OLD.status IN ('todo', 'standby')
               AND NEW.closed_at IS NOT DISTINCT FROM OLD.closed_at) THEN
            NEW.closed_at := now();
        END IF;
    ELSE
        NEW.closed_at := NULL;
    END IF;

    -- rules 3 and 4: assignment on creation, written into the row itself
    IF TG_OP = 'INSERT' AND NEW.user_id IS NULL AND NEW.pipeline_id IN (1, 2) THEN
        IF NEW.pipeline_id = 1 THEN
            SELECT c.user_id INTO pick FROM public.bench_rr_counters c
              JOIN nocrm.users u ON u.id = c.user_id AND u.active
             WHERE c.grp = 3
             ORDER BY c.assigned, c.position LIMIT 1
               FOR UPDATE OF c SKIP LOCKED;
            IF pick IS NULL THEN   -- everyone locked: wait for the lowest
                SELECT c.user_id INTO pick FROM public.bench_rr_counters c
                  JOIN nocrm.users u ON u.id = c.user_id AND u.active
                 WHERE c.grp = 3 ORDER BY c.assigned, c.position LIMIT 1
                   FOR UPDATE OF c;
            END IF;
            UPDATE public.bench_rr_counters SET assigned = assigned + 1
             WHERE grp = 3 AND user_id = pick;
        ELSE
            SELECT c.user_id INTO pick FROM public.bench_rr_counters c
              JOIN nocrm.users u ON u.id = c.user_id AND u.active
             WHERE c.grp = 4
             ORDER BY (SELECT count(*) FROM nocrm.leads l
                        WHERE l.user_id = c.user_id AND l.status IN ('todo', 'standby')),
                      c.assigned, c.position
             LIMIT 1 FOR UPDATE OF c SKIP LOCKED;
            UPDATE public.bench_rr_counters SET assigned = assigned + 1
             WHERE grp = 4 AND user_id = pick;
        END IF;
        IF pick IS NOT NULL THEN
            NEW.user_id := pick;
            -- tell the AFTER trigger the owner came from the rule
            PERFORM set_config('bench.assigned_by', NEW.id::text || ':' ||
                               CASE WHEN NEW.pipeline_id = 1 THEN '3' ELSE '4' END, true);
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION public.bench_lead_after() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ev  text[]    := '{}';
    aut integer[] := '{}';
    act bigint[]  := '{}';
    dep integer[] := '{}';
    ov  jsonb[]   := '{}';
    nv  jsonb[]   := '{}';
    det text[]    := '{}';
    r_aut integer[] := '{}';   -- automation_runs rows
    r_ev  text[]    := '{}';
    r_ch  jsonb[]   := '{}';
    r_act jsonb[]   := '{}';
    nid bigint;
    qid bigint;
    asg text;
    rule integer;
    msg text;
    o jsonb := '{}';
    n jsonb := '{}';
    c_o jsonb := '{}';
    c_n jsonb := '{}';
    added boolean;
    tagres jsonb;
    acts jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        ev := ev || 'lead.creation'::text; aut := aut || NULL::integer; act := act || NULL::bigint;
        dep := dep || 0; ov := ov || NULL::jsonb; nv := nv || jsonb_build_object('title', NEW.title);
        det := det || NULL::text;
        -- rule 1: notify Sara
        msg := 'Nuovo lead: ' || NEW.title;
        INSERT INTO nocrm.notifications (user_id, lead_id, automation_id, message)
        VALUES (4, NEW.id, 1, msg) RETURNING id INTO nid;
        PERFORM pg_notify('nocrm_notifications', json_build_object('id', nid, 'user_id', 4,
            'lead_id', NEW.id, 'automation_id', 1, 'message', left(msg, 1000),
            'truncated', length(msg) > 1000)::text);
        ev := ev || 'action.notify'::text; aut := aut || 1; act := act || 0::bigint; dep := dep || 1;
        ov := ov || NULL::jsonb; nv := nv || jsonb_build_object('notification_id', nid); det := det || 'browser'::text;
        r_aut := r_aut || 1; r_ev := r_ev || 'lead.creation'::text;
        r_ch := r_ch || jsonb_build_object('old', NULL, 'new', jsonb_build_object('title', NEW.title));
        r_act := r_act || jsonb_build_array(jsonb_build_object('no', 1, 'type', 'notify',
                     'detail', 'browser', 'result', jsonb_build_object('notification_id', nid)));
        -- rules 3/4: the BEFORE trigger picked the owner
        asg := current_setting('bench.assigned_by', true);
        IF asg IS NOT NULL AND asg <> '' AND split_part(asg, ':', 1) = NEW.id::text THEN
            rule := split_part(asg, ':', 2)::integer;
            ev := ev || CASE rule WHEN 3 THEN 'action.assign_round_robin' ELSE 'action.assign_balanced' END
                     || 'lead.assigned'::text || 'lead.any_update'::text;
            aut := aut || rule || rule || rule; act := act || 0::bigint || 0::bigint || 0::bigint;
            dep := dep || 1 || 1 || 1;
            ov := ov || '{"user_id": null}'::jsonb || '{"user_id": null}'::jsonb || '{"user_id": null}'::jsonb;
            nv := nv || jsonb_build_object('user_id', NEW.user_id) || jsonb_build_object('user_id', NEW.user_id)
                     || jsonb_build_object('user_id', NEW.user_id);
            det := det || NULL::text || NULL::text || NULL::text;
            r_aut := r_aut || rule; r_ev := r_ev || 'lead.creation'::text;
            r_ch := r_ch || jsonb_build_object('old', NULL, 'new', jsonb_build_object('title', NEW.title));
            r_act := r_act || jsonb_build_array(jsonb_build_object('no', 1,
                         'type', CASE rule WHEN 3 THEN 'assign_round_robin' ELSE 'assign_balanced' END,
                         'before', '{"user_id": null}'::jsonb, 'result', jsonb_build_object('user_id', NEW.user_id)));
        ELSE
            ev := ev || CASE WHEN NEW.user_id IS NULL THEN 'lead.unassigned' ELSE 'lead.assigned' END;
            aut := aut || NULL::integer; act := act || NULL::bigint; dep := dep || 0;
            ov := ov || '{"user_id": null}'::jsonb; nv := nv || jsonb_build_object('user_id', NEW.user_id);
            det := det || NULL::text;
        END IF;

    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW IS NOT DISTINCT FROM OLD THEN
            RETURN NULL;
        END IF;
        -- lead.status.changed.to
        IF NEW.status IS DISTINCT FROM OLD.status THEN
            ev := ev || 'lead.status.changed.to'::text; aut := aut || NULL::integer; act := act || NULL::bigint;
            dep := dep || 0; ov := ov || jsonb_build_object('status', OLD.status);
            nv := nv || jsonb_build_object('status', NEW.status); det := det || NULL::text;
            o := o || jsonb_build_object('status', OLD.status); n := n || jsonb_build_object('status', NEW.status);
            IF NEW.status = 'won' THEN      -- rule 6
                INSERT INTO nocrm.tags (lead_id, name) VALUES (NEW.id, 'Upsell Opportunity')
                ON CONFLICT DO NOTHING;
                added := FOUND;
                ev := ev || 'action.add_tags'::text; aut := aut || 6; act := act || 0::bigint; dep := dep || 1;
                IF added THEN
                    tagres := '{"tags": ["Upsell Opportunity"]}';
                    ov := ov || NULL::jsonb; nv := nv || tagres; det := det || NULL::text;
                    ev := ev || 'lead.any_update'::text; aut := aut || 6; act := act || 0::bigint; dep := dep || 1;
                    ov := ov || NULL::jsonb; nv := nv || '{"tag": "Upsell Opportunity"}'::jsonb;
                    det := det || 'tag added'::text;
                    acts := jsonb_build_array(jsonb_build_object('no', 1, 'type', 'add_tags', 'result', tagres));
                ELSE
                    ov := ov || NULL::jsonb; nv := nv || NULL::jsonb;
                    det := det || 'the lead already has these tags'::text;
                    acts := jsonb_build_array(jsonb_build_object('no', 1, 'type', 'add_tags',
                                'detail', 'the lead already has these tags'));
                END IF;
                r_aut := r_aut || 6; r_ev := r_ev || 'lead.status.changed.to'::text;
                r_ch := r_ch || jsonb_build_object('old', jsonb_build_object('status', OLD.status),
                                                   'new', jsonb_build_object('status', NEW.status));
                r_act := r_act || acts;
            END IF;
        END IF;
        -- lead.step.changed.to
        IF NEW.step_id IS DISTINCT FROM OLD.step_id AND NEW.step_id IS NOT NULL THEN
            ev := ev || 'lead.step.changed.to'::text; aut := aut || NULL::integer; act := act || NULL::bigint;
            dep := dep || 0; ov := ov || jsonb_build_object('step_id', OLD.step_id);
            nv := nv || jsonb_build_object('step_id', NEW.step_id); det := det || NULL::text;
            IF NEW.step_id = 3 AND NEW.pipeline_id = 1 THEN     -- rule 5
                acts := '[]';
                IF NEW.contact_email IS NOT NULL THEN
                    INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, recipient, payload)
                    VALUES ('email', 5, 0, NEW.id, 'lead.step.changed.to', NEW.contact_email,
                            jsonb_build_object('to', NEW.contact_email, 'template', 'quote_followup'))
                    RETURNING id INTO qid;
                    ev := ev || 'action.send_email'::text; aut := aut || 5; act := act || 0::bigint; dep := dep || 1;
                    ov := ov || NULL::jsonb; nv := nv || jsonb_build_object('queue_id', qid); det := det || NULL::text;
                    acts := acts || jsonb_build_object('no', 1, 'type', 'send_email',
                                                       'result', jsonb_build_object('queue_id', qid));
                ELSE
                    ev := ev || 'action.send_email'::text; aut := aut || 5; act := act || 0::bigint; dep := dep || 1;
                    ov := ov || NULL::jsonb; nv := nv || NULL::jsonb;
                    det := det || 'skipped: the lead has no contact_email and the action no "to"'::text;
                    acts := acts || jsonb_build_object('no', 1, 'type', 'send_email',
                                'detail', 'skipped: the lead has no contact_email and the action no "to"');
                END IF;
                INSERT INTO nocrm.tags (lead_id, name) VALUES (NEW.id, 'Preventivo inviato')
                ON CONFLICT DO NOTHING;
                added := FOUND;
                ev := ev || 'action.add_tags'::text; aut := aut || 5; act := act || 0::bigint; dep := dep || 1;
                IF added THEN
                    ov := ov || NULL::jsonb; nv := nv || '{"tags": ["Preventivo inviato"]}'::jsonb; det := det || NULL::text;
                    ev := ev || 'lead.any_update'::text; aut := aut || 5; act := act || 0::bigint; dep := dep || 1;
                    ov := ov || NULL::jsonb; nv := nv || '{"tag": "Preventivo inviato"}'::jsonb;
                    det := det || 'tag added'::text;
                    acts := acts || jsonb_build_object('no', 2, 'type', 'add_tags',
                                                       'result', '{"tags": ["Preventivo inviato"]}'::jsonb);
                ELSE
                    ov := ov || NULL::jsonb; nv := nv || NULL::jsonb;
                    det := det || 'the lead already has these tags'::text;
                    acts := acts || jsonb_build_object('no', 2, 'type', 'add_tags',
                                                       'detail', 'the lead already has these tags');
                END IF;
                r_aut := r_aut || 5; r_ev := r_ev || 'lead.step.changed.to'::text;
                r_ch := r_ch || jsonb_build_object('old', jsonb_build_object('step_id', OLD.step_id),
                                                   'new', jsonb_build_object('step_id', NEW.step_id));
                r_act := r_act || acts;
            END IF;
        END IF;
        IF NEW.step_id IS DISTINCT FROM OLD.step_id THEN
            o := o || jsonb_build_object('step_id', OLD.step_id); n := n || jsonb_build_object('step_id', NEW.step_id);
        END IF;
        IF NEW.pipeline_id IS DISTINCT FROM OLD.pipeline_id THEN
            o := o || jsonb_build_object('pipeline_id', OLD.pipeline_id); n := n || jsonb_build_object('pipeline_id', NEW.pipeline_id);
        END IF;
        -- lead.assigned / lead.unassigned
        IF NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            ev := ev || CASE WHEN NEW.user_id IS NULL THEN 'lead.unassigned' ELSE 'lead.assigned' END;
            aut := aut || NULL::integer; act := act || NULL::bigint; dep := dep || 0;
            ov := ov || jsonb_build_object('user_id', OLD.user_id); nv := nv || jsonb_build_object('user_id', NEW.user_id);
            det := det || NULL::text;
            o := o || jsonb_build_object('user_id', OLD.user_id); n := n || jsonb_build_object('user_id', NEW.user_id);
        END IF;
        -- lead.content_has_changed
        IF NEW.title IS DISTINCT FROM OLD.title THEN
            c_o := c_o || jsonb_build_object('title', OLD.title); c_n := c_n || jsonb_build_object('title', NEW.title); END IF;
        IF NEW.amount IS DISTINCT FROM OLD.amount THEN
            c_o := c_o || jsonb_build_object('amount', OLD.amount); c_n := c_n || jsonb_build_object('amount', NEW.amount); END IF;
        IF NEW.probability IS DISTINCT FROM OLD.probability THEN
            c_o := c_o || jsonb_build_object('probability', OLD.probability); c_n := c_n || jsonb_build_object('probability', NEW.probability); END IF;
        IF NEW.description IS DISTINCT FROM OLD.description THEN
            c_o := c_o || jsonb_build_object('description', OLD.description); c_n := c_n || jsonb_build_object('description', NEW.description); END IF;
        IF NEW.contact_email IS DISTINCT FROM OLD.contact_email THEN
            c_o := c_o || jsonb_build_object('contact_email', OLD.contact_email); c_n := c_n || jsonb_build_object('contact_email', NEW.contact_email); END IF;
        IF NEW.next_action_at IS DISTINCT FROM OLD.next_action_at THEN
            c_o := c_o || jsonb_build_object('next_action_at', OLD.next_action_at); c_n := c_n || jsonb_build_object('next_action_at', NEW.next_action_at); END IF;
        IF c_n <> '{}' THEN
            ev := ev || 'lead.content_has_changed'::text; aut := aut || NULL::integer; act := act || NULL::bigint;
            dep := dep || 0; ov := ov || c_o; nv := nv || c_n; det := det || NULL::text;
        END IF;
        o := o || c_o; n := n || c_n;
        IF n <> '{}' OR o <> '{}' THEN
            ev := ev || 'lead.any_update'::text; aut := aut || NULL::integer; act := act || NULL::bigint;
            dep := dep || 0; ov := ov || o; nv := nv || n; det := det || NULL::text;
        END IF;

    ELSE  -- DELETE: history, rule 2
        msg := 'Lead eliminato: ' || OLD.title;
        INSERT INTO nocrm.notifications (user_id, lead_id, automation_id, message)
        VALUES (4, OLD.id, 2, msg) RETURNING id INTO nid;
        PERFORM pg_notify('nocrm_notifications', json_build_object('id', nid, 'user_id', 4,
            'lead_id', OLD.id, 'automation_id', 2, 'message', left(msg, 1000),
            'truncated', length(msg) > 1000)::text);
        INSERT INTO nocrm.lead_history (lead_id, event, actor_id, automation_id, chain_depth, old_value, new_value, detail)
        VALUES (OLD.id, 'lead.deleted', NULL, NULL, 0, jsonb_build_object('title', OLD.title), NULL, NULL),
               (OLD.id, 'action.notify', 0, 2, 1, NULL, jsonb_build_object('notification_id', nid), 'browser');
        INSERT INTO nocrm.automation_runs (automation_id, lead_id, event, outcome, change, chain_depth, nactions, actions)
        VALUES (2, OLD.id, 'lead.deleted', 'fired',
                jsonb_build_object('old', jsonb_build_object('title', OLD.title), 'new', NULL), 1, 1,
                jsonb_build_array(jsonb_build_object('no', 1, 'type', 'notify', 'detail', 'browser',
                                  'result', jsonb_build_object('notification_id', nid))));
        RETURN NULL;
    END IF;

    IF cardinality(ev) > 0 THEN
        INSERT INTO nocrm.lead_history (lead_id, event, actor_id, automation_id, chain_depth, old_value, new_value, detail)
        SELECT NEW.id, u.e, u.a, u.au, u.d, u.o, u.n, u.t
          FROM unnest(ev, act, aut, dep, ov, nv, det) AS u(e, a, au, d, o, n, t);
    END IF;
    IF cardinality(r_aut) > 0 THEN
        INSERT INTO nocrm.automation_runs (automation_id, lead_id, event, outcome, change, chain_depth, nactions, actions)
        SELECT u.au, NEW.id, u.e, 'fired', u.c, 1, jsonb_array_length(u.ac), u.ac
          FROM unnest(r_aut, r_ev, r_ch, r_act) AS u(au, e, c, ac);
    END IF;
    RETURN NULL;
END $$;

-- Tags written by a person (not by the rules above, which log their own).
CREATE OR REPLACE FUNCTION public.bench_tag_after() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO nocrm.lead_history (lead_id, event, chain_depth, old_value, detail)
        VALUES (OLD.lead_id, 'lead.any_update', 0, jsonb_build_object('tag', OLD.name), 'tag removed');
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO nocrm.lead_history (lead_id, event, chain_depth, new_value, detail)
        VALUES (NEW.lead_id, 'lead.any_update', 0, jsonb_build_object('tag', NEW.name), 'tag added');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION public.bench_comment_email_after() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'comments' THEN
        INSERT INTO nocrm.lead_history (lead_id, event, chain_depth, new_value)
        VALUES (NEW.lead_id, 'lead.commented', 0, jsonb_build_object('comment', NEW.body));
    ELSE
        INSERT INTO nocrm.lead_history (lead_id, event, chain_depth, new_value)
        VALUES (NEW.lead_id, 'lead.email.received', 0, jsonb_build_object('subject', NEW.subject));
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS bench_lead_before ON nocrm.leads;
DROP TRIGGER IF EXISTS bench_lead_after ON nocrm.leads;
DROP TRIGGER IF EXISTS bench_tag_after ON nocrm.tags;
DROP TRIGGER IF EXISTS bench_comment_after ON nocrm.comments;
DROP TRIGGER IF EXISTS bench_email_after ON nocrm.emails;
CREATE TRIGGER bench_lead_before BEFORE INSERT OR UPDATE ON nocrm.leads
    FOR EACH ROW EXECUTE FUNCTION public.bench_lead_before();
CREATE TRIGGER bench_lead_after AFTER INSERT OR UPDATE OR DELETE ON nocrm.leads
    FOR EACH ROW EXECUTE FUNCTION public.bench_lead_after();
CREATE TRIGGER bench_tag_after AFTER INSERT OR UPDATE OR DELETE ON nocrm.tags
    FOR EACH ROW EXECUTE FUNCTION public.bench_tag_after();
CREATE TRIGGER bench_comment_after AFTER INSERT ON nocrm.comments
    FOR EACH ROW EXECUTE FUNCTION public.bench_comment_email_after();
CREATE TRIGGER bench_email_after AFTER INSERT ON nocrm.emails
    FOR EACH ROW EXECUTE FUNCTION public.bench_comment_email_after();
ALTER TABLE nocrm.leads DISABLE TRIGGER bench_lead_before;
ALTER TABLE nocrm.leads DISABLE TRIGGER bench_lead_after;
ALTER TABLE nocrm.tags DISABLE TRIGGER bench_tag_after;
ALTER TABLE nocrm.comments DISABLE TRIGGER bench_comment_after;
ALTER TABLE nocrm.emails DISABLE TRIGGER bench_email_after;
