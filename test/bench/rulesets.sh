# rulesets.sh — sourced by the engine benchmarks: the CRM every run starts
# with and the rule sets it measures.  load_rules needs psql_ from the caller.

# users 1..4; pipeline 1 Vendite (steps 1..3, Preventivo = 3), 2 Onboarding (4, 5), 3 Altro (6)
BENCH_CRM_SQL="INSERT INTO nocrm.users (name, email) VALUES ('Anna','anna@example.com'),('Matteo','matteo@example.com'),
  ('Giovanni','giovanni@example.com'),('Sara','sara@example.com');
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite'), ('Onboarding'), ('Altro');
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (1,'Nuovo',1),(1,'Qualificato',2),(1,'Preventivo',3),
  (2,'Kickoff',1),(2,'Preventivo',2),(3,'Inizio',1);
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('quote_followup','Il suo preventivo: {{lead.title}}','Gentile cliente');
"

# (b): the five examples of noCRM's help page (notify on deletion counts as part of the first)
RULES_B="
SELECT nocrm.create_automation(name=>'notify on creation', event=>'lead.creation',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Nuovo lead: {{lead.title}}\"}]');
SELECT nocrm.create_automation(name=>'notify on deletion', event=>'lead.deleted',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Lead eliminato: {{lead.title}}\"}]');
SELECT nocrm.create_automation(name=>'round robin', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
  actions=>'[{\"type\":\"assign_round_robin\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');
SELECT nocrm.create_automation(name=>'balanced', event=>'lead.creation', conditions=>'{\"pipeline\":\"Onboarding\",\"owner\":null}',
  actions=>'[{\"type\":\"assign_balanced\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');
SELECT nocrm.create_automation(name=>'Preventivo', event=>'lead.step.changed.to', target=>'Preventivo', conditions=>'{\"pipeline\":\"Vendite\"}',
  actions=>'[{\"type\":\"send_email\",\"template\":\"quote_followup\"},{\"type\":\"add_tags\",\"tags\":[\"Preventivo inviato\"]}]');
SELECT nocrm.create_automation(name=>'won upsell', event=>'lead.status.changed.to', target=>'won',
  actions=>'[{\"type\":\"add_tags\",\"tags\":[\"Upsell Opportunity\"]}]');
"
# The anchor's rule sets (core_bench.sh, handwritten_rules.sql): seed5 = (b)
# without "balanced", so its rules get ids 1..5 (notify on creation, notify
# on deletion, round robin, Preventivo, won upsell); seed3 = notify on
# creation, round robin, won upsell (ids 1..3).
RULE_NOTIFY_CREATION="
SELECT nocrm.create_automation(name=>'notify on creation', event=>'lead.creation',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Nuovo lead: {{lead.title}}\"}]');"
RULE_NOTIFY_DELETION="
SELECT nocrm.create_automation(name=>'notify on deletion', event=>'lead.deleted',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Lead eliminato: {{lead.title}}\"}]');"
RULE_ROUND_ROBIN="
SELECT nocrm.create_automation(name=>'round robin', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
  actions=>'[{\"type\":\"assign_round_robin\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');"
RULE_PREVENTIVO="
SELECT nocrm.create_automation(name=>'Preventivo', event=>'lead.step.changed.to', target=>'Preventivo', conditions=>'{\"pipeline\":\"Vendite\"}',
  actions=>'[{\"type\":\"send_email\",\"template\":\"quote_followup\"},{\"type\":\"add_tags\",\"tags\":[\"Preventivo inviato\"]}]');"
RULE_WON="
SELECT nocrm.create_automation(name=>'won upsell', event=>'lead.status.changed.to', target=>'won',
  actions=>'[{\"type\":\"add_tags\",\"tags\":[\"Upsell Opportunity\"]}]');"
RULES_SEED5="$RULE_NOTIFY_CREATION $RULE_NOTIFY_DELETION $RULE_ROUND_ROBIN $RULE_PREVENTIVO $RULE_WON"
RULES_SEED3="$RULE_NOTIFY_CREATION $RULE_ROUND_ROBIN $RULE_WON"

# N rules on other events (comments, emails, status lost), or on lead.creation
# with a condition that never holds for the benchmark's leads.
extra_rules() {  # extra_rules N MODE  (MODE: mixed | other)
    cat <<EOF
INSERT INTO nocrm.automations (name, event, target, conditions, actions)
SELECT 'extra ' || g,
       CASE WHEN '$2' = 'mixed' AND g % 4 = 0 THEN 'lead.creation'
            WHEN g % 3 = 0 THEN 'lead.commented' WHEN g % 3 = 1 THEN 'lead.email.received'
            ELSE 'lead.status.changed.to' END,
       CASE WHEN ('$2' <> 'mixed' OR g % 4 <> 0) AND g % 3 = 2 THEN 'lost' END,
       CASE WHEN '$2' = 'mixed' AND g % 4 = 0 THEN '{"pipeline": "Onboarding", "status": "lost"}'::jsonb
            ELSE '{}'::jsonb END,
       jsonb_build_array(jsonb_build_object('type', 'add_tags', 'tags', jsonb_build_array('extra ' || g)))
  FROM generate_series(1, $1) g;
EOF
}
# 1,000 lead.creation rules whose field conditions fail on the bench's leads:
# numeric thresholds, text equality, IN lists, ranges inside groups.
field_rules() {
    cat <<EOF
INSERT INTO nocrm.automations (name, event, conditions, actions)
SELECT 'field ' || g, 'lead.creation',
       CASE g % 4
         WHEN 0 THEN jsonb_build_object('field', 'amount', 'op', '>', 'value', 1000000000 + g)
         WHEN 1 THEN jsonb_build_object('field', 'contact_email', 'op', '=', 'value', 'nobody' || g || '@nowhere.test')
         WHEN 2 THEN jsonb_build_object('field', 'title', 'op', 'in', 'values', jsonb_build_array('t' || g || 'a', 't' || g || 'b'))
         ELSE jsonb_build_object('all', jsonb_build_array(
                jsonb_build_object('field', 'probability', 'op', 'between', 'value', jsonb_build_array(101 + g, 200 + g)),
                jsonb_build_object('any', jsonb_build_array(jsonb_build_object('has_tag', 'x'),
                                                            jsonb_build_object('field', 'title', 'op', 'contains', 'value', 'zz')))))
       END,
       jsonb_build_array(jsonb_build_object('type', 'add_tags', 'tags', jsonb_build_array('field ' || g)))
  FROM generate_series(1, $1) g;
EOF
}
load_rules() {  # load_rules none|b|c|seed5|seed3|nomatch1000|fields1000|other10|other10000|rr|assign
    local sql="SET client_min_messages = warning; TRUNCATE nocrm.automations RESTART IDENTITY CASCADE;"
    case $1 in
        none) ;;
        b) sql+="$RULES_B" ;;
        c) sql+="$RULES_B $(extra_rules 1000 mixed)" ;;
        seed5) sql+="$RULES_SEED5" ;;
        seed3) sql+="$RULES_SEED3" ;;
        nomatch1000) sql+="$(extra_rules 1000 mixed)" ;;
        fields1000) sql+="$(field_rules 1000)" ;;
        other10) sql+="$(extra_rules 10 other)" ;;
        other10000) sql+="$(extra_rules 10000 other)" ;;
        rr) sql+="SELECT nocrm.create_automation(name=>'rr', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
              actions=>'[{\"type\":\"assign_round_robin\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');" ;;
        assign) sql+="SELECT nocrm.create_automation(name=>'assign', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
              actions=>'[{\"type\":\"assign\",\"user\":\"anna@example.com\"}]');" ;;
    esac
    psql_ -c "$sql" >/dev/null
}
